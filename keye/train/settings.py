"""Stage recipes as data: one validated `StageSettings` per training stage (the pipeline lists them in YAML).

Stages follow Keye-VL-1.5 / Keye-VL-2.0 (projector-only alignment, full pre-training, grounding-heavy multi-task,
long context with a raised RoPE base, SFT) and DeepSeek-V3.2's two DSA stages (dense warm-up of the indexer alone
with the KL loss at a high LR, then sparse training of everything with the indexer detached); REFERENCE.md 1-2.

The recipes themselves are stated once, in the pipeline config (pipelines.yaml: the default tiny CPU recipes).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StageKind = Literal["align", "pretrain", "multitask", "long_warmup", "long_sparse", "sft"]
Trainable = Literal["projector", "all", "indexer"]
AttentionMode = Literal["dense", "dsa_warmup", "dsa"]

# what each kind means when the recipe does not say otherwise: (trainable, attention mode, answer-only loss)
KIND_DEFAULTS: dict[str, tuple[str, str, bool]] = {
    "align": ("projector", "dense", True),
    "pretrain": ("all", "dense", False),
    "multitask": ("all", "dense", True),
    "long_warmup": ("indexer", "dsa_warmup", True),
    "long_sparse": ("all", "dsa", True),
    "sft": ("all", "dense", True),
}


class StageSettings(BaseModel):
    """One training stage. Fields left None take the kind's meaning (KIND_DEFAULTS); contradictions are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: StageKind
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr (cosine, wsd)")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    tokens_per_step: int = Field(gt=0, description="global token budget of one optimizer step")
    trainable: Trainable | None = None
    attention_mode: AttentionMode | None = None
    rope_base: float | None = Field(None, gt=0, description="new LM RoPE base (long context raises it)")
    dsa_selection: Literal["token", "block"] | None = Field(
        None,
        description="DSA top-k per query token, or one set per query block (NSA / MoBA style); None: the start "
        "checkpoint's (the preset's: token). Written into the checkpoint's model config, so eval, serve and "
        "decode use the mode the model was trained with",
    )
    dsa_selection_block: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="query tokens per block of dsa_selection=block (None: the start's, 64)",
    )
    dsa_indexer_dtype: Literal["bf16", "fp8"] | None = Field(
        None,
        description="DSA indexer precision: fp8 runs the token top-k on e4m3 queries/keys (per-token scales) and "
        "keeps decode's indexer key cache in e4m3; the indexer's KL stays in the model dtype. None: the start "
        "checkpoint's (the preset's: bf16). Written into the checkpoint's model config",
    )
    task_weights: dict[str, float] = Field(default_factory=dict)
    answer_only_loss: bool | None = None
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean",
        description="how target tokens make the step's loss (verl's names): token-mean weighs every target token "
        "alike, so tasks with long answers (captions) take most of the gradient; seq-mean-token-mean averages "
        "within each sample, then over the step's samples, so each sample counts once whatever its answer length",
    )
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    moe_balance: Literal["aux", "bias"] = "aux"
    aux_coef: float = Field(1e-3, ge=0)
    bias_rate: float = Field(1e-3, ge=0, description="aux-loss-free bias update rate (moe_balance=bias)")
    checkpoint_every: int = Field(50, gt=0)
    keep_last: int = Field(2, ge=1)
    nan_policy: Literal["skip", "stop"] = "skip"
    max_bad_steps: int = Field(10, ge=1, description="consecutive skipped steps before giving up")
    seed: int = 0
    activation_checkpointing: bool = False
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(1, gt=0)
    probe_every: int = Field(10, gt=0, description="steps between DSA top-k mass probes")
    peak_flops: float | None = Field(
        None, gt=0, description="per-device peak for MFU (default: H200 bf16 on CUDA)"
    )

    @model_validator(mode="after")
    def _fill_and_check(self) -> StageSettings:
        trainable, mode, answer_only = KIND_DEFAULTS[self.kind]
        if self.trainable is None:
            self.trainable = trainable  # type: ignore[assignment]
        if self.attention_mode is None:
            self.attention_mode = mode  # type: ignore[assignment]
        if self.answer_only_loss is None:
            self.answer_only_loss = answer_only
        if self.kind == "long_warmup" and (
            self.trainable != "indexer" or self.attention_mode != "dsa_warmup"
        ):
            raise ValueError(
                "long_warmup trains only the indexer (trainable=indexer) with attention_mode=dsa_warmup"
            )
        if self.kind == "long_sparse" and self.attention_mode != "dsa":
            raise ValueError("long_sparse needs attention_mode=dsa")
        if self.kind == "align" and self.trainable != "projector":
            raise ValueError("align trains the projector only (trainable=projector)")
        if self.trainable == "indexer" and self.attention_mode == "dense":
            raise ValueError(
                "trainable=indexer needs a DSA attention mode (the indexer gets no loss in dense)"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} > steps {self.steps}")
        bad = {k: v for k, v in self.task_weights.items() if v < 0}
        if bad:
            raise ValueError(f"task_weights must be >= 0, got {bad}")
        return self

    def tasks(self) -> list[str] | None:
        """Tasks to pack for this stage (weight > 0), or None for all of them."""
        if not self.task_weights:
            return None
        return [t for t, w in self.task_weights.items() if w > 0]
