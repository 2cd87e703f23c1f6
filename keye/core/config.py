"""The schema of pipelines.yaml: one pydantic model, so a bad config fails before any work starts.

Errors name the field path (e.g. `caption.backend`) and the reason. `--set a.b=value` overrides are applied to the
raw YAML before validation, so they are checked by the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keye.data.sampling import SamplingPolicy
from keye.train.parallel import ParallelSettings
from keye.train.settings import StageSettings

# Stage names in pipeline order. Later stages join this list as they are built.
STAGE_ORDER: tuple[str, ...] = (
    "ingest", "caption", "shard", "pack", "train", "video_rl", "specialists", "mopd", "agent_rl", "eval",
)  # fmt: skip
# Stages a config runs only when it lists them (`stages:`): not part of the default pipeline's budget.
OPT_IN_STAGES: tuple[str, ...] = ("specialists", "mopd")


class ConfigError(ValueError):
    """A config problem a person can fix: the message names the file, the field path and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticSource(_Strict):
    """The embedded default: deterministic synthetic event videos generated into the workspace."""

    kind: Literal["synthetic"] = "synthetic"
    n_videos: int = Field(40, ge=1, le=100_000)
    n_long: int = Field(1, ge=0, le=1000)
    seed: int = 0
    heldout_fraction: float = Field(
        0.175,
        ge=0.0,
        lt=1.0,
        description="share of the short videos in the held-out (eval) split; 0: train only",
    )
    max_objects: int = Field(
        3, ge=1, le=3, description="shapes per short video at most (1: every question is about the one shape)"
    )
    color_changes: bool = Field(True, description="shapes may change colour mid-video")


class PathSource(_Strict):
    """A folder, a glob, an fsspec URL, or a manifest file (.txt: one path per line; .jsonl/.csv: a `path` field)."""

    kind: Literal["path"] = "path"
    path: str
    recursive: bool = True

    @field_validator("path")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty: give a folder, glob, URL or manifest file")
        return v


Source = Annotated[SyntheticSource | PathSource, Field(discriminator="kind")]


class IngestSettings(_Strict):
    extensions: list[str] = Field(
        default_factory=lambda: [".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".ts", ".mpg", ".mpeg"]
    )
    min_duration: float = Field(1.0, ge=0, description="shorter videos are rejected (seconds)")
    max_clip_seconds: float = Field(30.0, gt=0)
    min_clip_seconds: float = Field(1.0, gt=0)
    scene_threshold: float = Field(
        30.0,
        gt=0,
        le=255,
        description="mean abs difference (0-255) of small thumbnails that marks a scene cut",
    )
    analysis_fps: float = Field(2.0, gt=0, le=30)
    batch_size: int = Field(8, ge=1, description="videos per Prefect task")

    @model_validator(mode="after")
    def _clip_bounds(self) -> IngestSettings:
        if self.min_clip_seconds > self.max_clip_seconds:
            raise ValueError("min_clip_seconds must not exceed max_clip_seconds")
        return self


class CaptionSettings(_Strict):
    backend: Literal["sidecar", "openai", "hf", "keye"] = "sidecar"
    # backend-specific options (endpoint, model, api_key_env, concurrency, timeout_s, retries, model_dir, ...)
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(16, ge=1, description="clips per Prefect task")


class ShardSettings(_Strict):
    target_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="size a shard is filled up to")
    max_side: int = Field(448, ge=28, description="long side of the re-encoded clip, pixels")
    fps: float | None = Field(None, gt=0, description="re-encode frame rate (None keeps the source rate)")
    gop_seconds: float = Field(1.0, gt=0, description="keyframe interval of the re-encoded clip")
    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$")
    batch_size: int = Field(8, ge=1, description="clips per encode task")


class TokenizerSettings(_Strict):
    path: str | None = Field(
        None, description="local Hugging Face tokenizer dir; None trains a byte-level BPE"
    )
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)


class PackSettings(_Strict):
    max_tokens: int = Field(262_144, ge=64, le=262_144, description="tokens per packed sequence")
    max_visual_tokens: int | None = Field(None, ge=1, description="visual tokens per pack (None: no limit)")
    max_frames: int | None = Field(None, ge=1, description="frames per pack (None: no limit)")
    oversize: Literal["drop_frames", "reject"] = "drop_frames"
    min_frames: int = Field(2, ge=1)
    tasks: list[Literal["caption", "dense", "grounding", "mcq", "text"]] = Field(
        default_factory=lambda: ["caption", "dense", "grounding", "mcq", "text"]
    )
    seed: int = 0
    mcq_orders: int = Field(
        1, ge=1, le=8, description="option orders each training MCQ is asked in (1: as annotated only)"
    )
    mcq_answer: Literal["letter", "option"] = Field(
        "letter",
        description="a training MCQ's answer: its letter, or the right option's text (which the eval maps back to "
        "the letter; a small model trained from scratch learns the latter far sooner)",
    )
    mcq_turns: int = Field(
        1,
        ge=1,
        le=16,
        description="questions of one clip per training MCQ sample, one per turn after one view of the frames",
    )
    grounding_answer: Literal["exact", "frames"] = Field(
        "exact",
        description="a training grounding query's answer: the annotated span, or the span the sampled frames "
        "bracket (keye.data.grounding_items.frame_span: two of the frame stamps the model was shown)",
    )
    grounding_windows: int = Field(
        0,
        ge=0,
        le=64,
        description="windows of the clip each training grounding query is also asked on (the event moved to "
        "another place in another length of video, so its answer cannot be memorised per clip)",
    )
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)


class TrainSettings(_Strict):
    preset: str = Field("tiny", description="model preset: tiny | small | 30b-a3b (keye.model.config)")
    device: str | None = Field(None, description="cpu | cuda (None: cuda when available)")
    init_checkpoint: str | None = Field(
        None, description="start from this checkpoint (e.g. `keye convert hf` output)"
    )
    stages: list[StageSettings] = Field(
        default_factory=list, description="the recipes in order (pipelines.yaml holds the default tiny ones)"
    )
    parallel: ParallelSettings = Field(
        default_factory=ParallelSettings,
        description="device mesh dp_shard x ep x cp (keye.train.parallel; `keye plan` suggests one)",
    )
    dsa_selection: Literal["token", "block"] | None = Field(
        None,
        description="DSA selection of every recipe that does not set its own: token (one top-k set per query "
        "token) | block (one per dsa_selection_block query tokens); None: the checkpoint's (the preset's: token)",
    )
    dsa_selection_block: int | None = Field(
        None, ge=1, le=4096, description="query block of dsa_selection=block for every recipe that sets none"
    )
    dsa_indexer_dtype: Literal["bf16", "fp8"] | None = Field(
        None,
        description="DSA indexer precision of every recipe that sets none: bf16 (the model dtype) | fp8 (e4m3 "
        "top-k and indexer key cache, token selection); None: the checkpoint's (the preset's: bf16)",
    )

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, v: list[StageSettings]) -> list[StageSettings]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"training stage names must be unique, got {names}")
        if not v:
            raise ValueError("at least one training stage is needed")
        return v

    @model_validator(mode="after")
    def _dsa_into_recipes(self) -> TrainSettings:
        """The model-wide DSA selection joins each recipe that leaves it unset, so the recipe (its cache key, its
        MLflow params, the trainer) states the mode it trains in; a recipe's own setting wins."""
        fill = {
            "dsa_selection": self.dsa_selection,
            "dsa_selection_block": self.dsa_selection_block,
            "dsa_indexer_dtype": self.dsa_indexer_dtype,
        }
        for recipe in self.stages:
            for name, value in fill.items():
                if value is not None and getattr(recipe, name) is None:
                    setattr(recipe, name, value)
        return self


class ContextRLConfig(_Strict):
    enabled: bool = Field(True, description="recover all-failed groups with a context (keye.rl.context_rl)")
    success_threshold: float = Field(0.5, description="a sample succeeds when its reward >= this")
    context: Literal["hint", "mistake_report"] = "hint"
    hint_level: Literal["answer", "partial"] = Field(
        "partial", description="answer: the reference itself; partial: a coarser hint (docs/TRAINING.md)"
    )
    resample_n: int | None = Field(
        None, ge=1, description="answers drawn with the context (None: group size)"
    )
    recovered_weight: float = Field(1.0, ge=0.0, description="multiplies a recovered sample's token losses")
    max_recovered: int | None = Field(None, ge=1, description="per group (None: group_size // 2)")


class VideoRLSettings(_Strict):
    """Video-RL on the SFT checkpoint (keye.rl): names follow verl / TRL (docs/TRAINING.md "Video-RL")."""

    steps: int = Field(200, ge=1, description="policy updates")
    lr: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)
    prompts_per_step: int = Field(
        32, ge=1, description="groups with signal per update (dynamic sampling refills)"
    )
    group_size: int = Field(8, ge=2, description="rollouts per prompt (GRPO group, G)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    tasks: list[str] = Field(
        default_factory=lambda: ["timelens"],
        description="question kinds of the training split to train on: timelens, videomme, videomme_v2, longvideobench",
    )
    grounding_windows: int = Field(
        0,
        ge=0,
        le=64,
        description="each grounding prompt also asked on this many windows of its video, shown as clips of their "
        "own (keye.rl.prompt_sets.window_prompts; the SFT curriculum's pack.grounding_windows). On the tiny default, "
        "RL on windows did not carry over to the whole-clip held-out queries (bench/RESULTS.md)",
    )
    rewards: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "timelens": {"time_r1": 1.0},
            "videomme": {"mcq": 1.0},
            "videomme_v2": {"mcq": 1.0},
            "longvideobench": {"mcq": 1.0},
        },
        description="per task kind: registered reward name -> weight (keye.rl.rewards; add your own by name)",
    )
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_agg_mode: Literal[
        "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "token-mean"
    clip_ratio_low: float = Field(0.2, ge=0)
    clip_ratio_high: float = Field(0.28, ge=0, description="DAPO clip-higher")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description="sequence: GSPO")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the frozen SFT policy (0: no reference model)")
    filter_groups: bool = Field(True, description="dynamic sampling: drop zero-variance groups and refill")
    max_num_gen_batches: int = Field(3, ge=1)
    overlong_buffer_len: int = Field(0, ge=0, description="DAPO soft overlong punishment (0: off)")
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(64, ge=1)
    engine: Literal["local", "openai"] = Field(
        "local", description="rollouts: in-process, or an OpenAI server"
    )
    base_url: str | None = Field(
        None, description="openai engine: e.g. http://127.0.0.1:8000/v1 (keye serve)"
    )
    served_model: str | None = Field(None, description="openai engine: the served model name")
    context_rl: ContextRLConfig = Field(default_factory=ContextRLConfig)
    freeze_vision: bool = Field(
        True,
        description="keep the ViT and the projector as SFT left them (false: they train too; on the tiny default "
        "both gain alike with whole-clip prompts, frozen at 2/3 of the cost: bench/RESULTS.md `## video_rl on 467 "
        "held-out queries`)",
    )
    save_every: int = Field(25, ge=1)
    device: str | None = Field(None, description="cpu | cuda (None: the train stage's)")

    @model_validator(mode="after")
    def _check(self) -> VideoRLSettings:
        missing = [t for t in self.tasks if t not in self.rewards]
        if missing:
            raise ValueError(f"video_rl.rewards has no entry for task(s) {missing}")
        if self.engine == "openai" and not (self.base_url and self.served_model):
            raise ValueError("video_rl.engine openai needs video_rl.base_url and video_rl.served_model")
        return self


class EvalSettings(_Strict):
    split: str = Field("heldout", description="annotation split the held-out benchmarks are built from")
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="questions per benchmark (None: all)")
    max_new_tokens: int = Field(24, ge=1)
    device: str = "cpu"
    blank_control: bool = Field(
        True,
        description="answer the pooled MCQs again with blank frames and test real vs blank (what the pixels add)",
    )
    registered_model: str = Field(
        "keye", description="MLflow registered model the evaluated checkpoint joins"
    )
    alias: str = Field("best", description="alias moved to the checkpoint when it beats the current holder")
    compare_parent: bool = Field(
        True,
        description="a post-trained checkpoint (video_rl) is also compared with the one it started from, "
        "question by question (paired tests; keye.eval.compare)",
    )
    grounding_probe_videos: int = Field(
        0,
        ge=0,
        le=100_000,
        description="synthetic sources: this many NEW held-out videos of the first synthetic source's generator "
        "(indices after its own; eval-only, never ingested or trained on), whose grounding queries are asked as "
        "the extra benchmark timelens_probe; the paired test of a post-trained checkpoint then has the queries to "
        "see a gain of ~1.5 mIoU (a per-query SD of ~14 needs ~900 for p < 0.01 at 80% power). 0: none",
    )


class AgentRLSettings(_Strict):
    """Agent RL (docs/AGENT_RL.md): GRPO over multi-turn episodes with the frames / search / python tools, on tasks
    derived from the training split's annotations; evaluated on the held-out split's agent tasks."""

    steps: int = Field(100, ge=1, description="policy updates")
    lr: float = Field(5e-5, gt=0)
    tasks_per_step: int = Field(8, ge=1, description="tasks (GRPO groups) per update")
    save_every: int = Field(25, ge=1, description="steps between step checkpoints")
    warmup_steps: int = Field(
        4500, ge=0, description="supervised steps on tool-use demonstrations before RL (a model that never calls a "
        "tool gives GRPO nothing to compare; 4500 x 4 demonstrations teach the default SFT model to copy from the turns of "
        "all three tools, bench/RESULTS.md `## agent_rl warm-up`: ~8 min on an H100, ~15-20 min on a 2-core CPU; one "
        "tool is learnt from 250 x 8, the default pipeline's search recipe, docs/AGENT_RL.md)",
    )  # fmt: skip
    warmup_lr: float = Field(3e-3, gt=0)
    warmup_batch_size: int = Field(4, ge=1, description="demonstrations per warm-up step")
    rl_only_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of the training videos whose tasks only RL sees (the warm-up "
        "memorises its demonstrations: GRPO on them finds no group that differs); 0 shares one task set",
    )  # fmt: skip
    group_size: int = Field(8, ge=2, description="episodes per task (GRPO group)")
    max_new_tokens: int = Field(128, ge=1, description="tokens per model turn (a whole call must fit)")
    max_response_tokens: int = Field(1024, ge=1, description="model + tool tokens after the prompt")
    max_turns: int = Field(4, ge=1)
    max_calls_per_turn: int = Field(2, ge=1)
    tools: list[Literal["frames", "search", "python"]] = Field(
        default_factory=lambda: ["frames", "search", "python"]
    )
    first_fps: float = Field(0.5, gt=0, description="frame rate of the opening view of frames tasks")
    frames_max: int = Field(
        10, ge=1, description="frames one `frames` call may return (10 pin a moment to 0.25 s in the default "
        "run's 2.5 s gaps between opening frames; moment tasks a look of this many cannot pin are not derived)",
    )  # fmt: skip
    python_time_s: float = Field(5.0, gt=0)
    python_memory_mb: int = Field(512, ge=128)
    temperature: float = Field(1.0, gt=0)
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    kl_coef: float = Field(0.0, ge=0)
    micro_batch_size: int = Field(16, ge=1)
    eval_limit: int | None = Field(None, ge=1, description="held-out agent tasks evaluated (None: all)")
    device: str | None = Field(None, description="cpu | cuda (None: train.device)")


class SpecialistDomain(_Strict):
    kinds: list[str] = Field(
        description="question kinds of the training split: timelens, videomme, ..., caption"
    )
    rewards: dict[str, float] = Field(description="registered reward name -> weight (keye.rl.rewards)")
    method: Literal["rl", "sft", "video_rl"] = Field(
        "rl", description="rl: outcome RL on the domain's prompts; sft: supervised steps on the PackSet's packs "
        "of the domain's pack task only (a model that never samples the domain's answers, e.g. captions, "
        "cannot learn them by RL); video_rl: the video_rl stage's checkpoint trained from the same start "
        "(grounding RL already run by the pipeline is not run twice)",
    )  # fmt: skip
    sft_task: str | None = Field(
        None, description="method sft: the pack task trained (caption, dense, grounding, mcq, text; None: the "
        "domain's name)",
    )  # fmt: skip


def _default_specialists() -> dict[str, SpecialistDomain]:
    return {
        "grounding": SpecialistDomain(kinds=["timelens"], rewards={"time_r1": 1.0}),
        "mcq": SpecialistDomain(kinds=["videomme"], rewards={"mcq": 1.0}),
        # SFT: outcome RL cannot teach captions to a model that never samples one (bench/RESULTS.md mopd_table)
        "caption": SpecialistDomain(kinds=["caption"], rewards={"caption_f1": 1.0}, method="sft"),
    }


class SpecialistsSettings(_Strict):
    """Per-domain teachers for MOPD, each trained from the SFT checkpoint on its domain only: by outcome RL
    (keye.rl.mopd_train without teachers: on-policy GRPO's gradient) or by SFT on the domain's pack task."""

    domains: dict[str, SpecialistDomain] = Field(default_factory=_default_specialists)
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, gt=0)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    save_every: int = Field(25, ge=1)
    sft_steps: int = Field(150, ge=1, description="method sft: updates of each SFT specialist")
    sft_lr: float = Field(1e-3, gt=0, description="method sft: peak lr (warm-up, stable, decay)")
    sft_tokens_per_step: int = Field(4096, ge=1, description="method sft: tokens per update")
    device: str | None = Field(None, description="cpu | cuda (None: the train stage's)")
    sequential: list[str] = Field(
        default_factory=list, description="the forgetting baseline of the MOPD table, e.g. [grounding, mcq]: the "
        "first domain's specialist trained further by each next domain's RL recipe, one after another on one "
        "model (empty: none)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _sequential_chain(self) -> SpecialistsSettings:
        if not self.sequential:
            return self
        unknown = [d for d in self.sequential if d not in self.domains]
        if unknown or len(self.sequential) < 2:
            raise ValueError(
                f"specialists.sequential {self.sequential}: list two or more of the domains {sorted(self.domains)}"
            )
        not_rl = [d for d in self.sequential[1:] if self.domains[d].method != "rl"]
        if not_rl:
            raise ValueError(
                f"specialists.sequential: {not_rl} after the first domain must use method rl (the chain applies "
                "their RL recipes to one model)"
            )
        return self

    @model_validator(mode="after")
    def _sft_tasks_exist(self) -> SpecialistsSettings:
        from keye.data.samples import TASKS

        for name, d in self.domains.items():
            task = d.sft_task or name
            if d.method == "sft" and task not in TASKS:
                raise ValueError(
                    f"specialists.domains.{name}: method sft trains a pack task, and {task!r} is none; set "
                    f"sft_task to one of {list(TASKS)}"
                )
        return self


class TeacherConfig(_Strict):
    source: str = Field(
        "specialist",
        description="specialist (the specialists stage's checkpoint of this domain), a checkpoint directory, or "
        "an OpenAI-compatible base_url (http...) returning prompt_logprobs",
    )
    served_model: str | None = Field(None, description="endpoint teachers: the served model name")
    view: Literal["video", "text"] = Field("video", description="text: the transcript instead of the frames")


class MOPDConfig(_Strict):
    """Multi-teacher on-policy distillation (keye.rl.mopd; MiMo-V2-Flash eq. 8-9)."""

    teachers: dict[str, TeacherConfig] = Field(
        default_factory=lambda: {d: TeacherConfig() for d in ("grounding", "mcq", "caption")},
        description="routing table: domain -> its one teacher (never averaged)",
    )
    rewards: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "grounding": {"time_r1": 1.0},
            "mcq": {"mcq": 1.0},
            "caption": {"caption_f1": 1.0},
        },
        description="outcome reward per domain (alpha * A_outcome)",
    )
    kinds: list[str] = Field(default_factory=lambda: ["timelens", "videomme", "caption"])
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of the outcome advantage")
    eps_low: float = Field(0.5, gt=0, le=1, description="gate on pi_theta / mu")
    eps_high: float = Field(2.0, ge=1)
    loss_agg_mode: Literal["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean"] = (
        "seq-mean-token-mean"
    )
    full_vocab_kl: bool = Field(
        False, description="exact reverse KL (checkpoint teachers sharing the tokenizer)"
    )
    teacher_sampled: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="domain -> share of its groups sampled by its teacher and learnt by "
        "log-likelihood (off-policy, GKD); for a domain the student never samples, e.g. captions",
    )  # fmt: skip
    micro_batch_size: int = Field(64, ge=1)
    seed: int | None = Field(
        None, description="the student's sampling and prompt order (None: the pipeline's seed)"
    )
    balance_domains: bool = Field(
        False, description="draw every domain's prompts as often as the largest domain's (its prompts repeated): "
        "a domain with few training prompts, e.g. one caption per video against several questions, otherwise "
        "gets few updates",
    )  # fmt: skip
    save_every: int = Field(25, ge=1)
    device: str | None = Field(None, description="cpu | cuda (None: the train stage's)")
    heldout_table: bool = Field(
        True,
        description="after training, score the student's start, every checkpoint specialist and the student on the "
        "held-out videos per domain (grounding mIoU, MCQ accuracy, caption F1; keye.eval.domain_table): the "
        "table goes to the run summary, MLflow and <checkpoint>/heldout_table",
    )
    table_limit: int | None = Field(
        None, ge=1, description="held-out MCQs and captions asked per checkpoint for the table (None: all)"
    )

    @model_validator(mode="after")
    def _sampling_teachers_exist(self) -> MOPDConfig:
        unknown = sorted(set(self.teacher_sampled) - set(self.teachers))
        if unknown:
            raise ValueError(
                f"teacher_sampled names domain(s) {unknown} without a teacher; teachers: {sorted(self.teachers)}"
            )
        return self


class TrackingSettings(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<workspace>/mlflow.db")
    experiment: str = "keye"


class RunnerSettings(_Strict):
    kind: Literal["thread", "process", "ray"] = "thread"
    max_workers: int = Field(2, ge=1)
    ray_address: str | None = None


class PipelineConfig(_Strict):
    name: str = "default"
    workspace: str = "./workspace"
    seed: int = Field(
        0, description="seed of the post-training stages (video_rl, specialists, mopd, agent_rl); each train "
        "recipe has its own `seed` (train.stages.<name>.seed), so this one does not retrain the SFT",
    )  # fmt: skip
    stages: list[str] = Field(default_factory=lambda: [s for s in STAGE_ORDER if s not in OPT_IN_STAGES])
    sources: list[Source] = Field(default_factory=lambda: [SyntheticSource()])
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    caption: CaptionSettings = Field(default_factory=CaptionSettings)
    shard: ShardSettings = Field(default_factory=ShardSettings)
    sampling: SamplingPolicy = Field(default_factory=SamplingPolicy)
    pack: PackSettings = Field(default_factory=PackSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    video_rl: VideoRLSettings = Field(default_factory=VideoRLSettings)
    specialists: SpecialistsSettings = Field(default_factory=SpecialistsSettings)
    mopd: MOPDConfig = Field(default_factory=MOPDConfig)
    agent_rl: AgentRLSettings = Field(default_factory=AgentRLSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known stages in order: {list(STAGE_ORDER)}")
        if len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return sorted(v, key=STAGE_ORDER.index)

    @field_validator("sources", mode="before")
    @classmethod
    def _infer_source_kind(cls, v: Any) -> Any:
        """Let users write `- path: /data/videos` or `- synthetic: {n_videos: 10}` without a `kind` key."""
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                item = {"kind": "path", "path": item}
            elif isinstance(item, dict) and "kind" not in item:
                if "path" in item:
                    item = {"kind": "path", **item}
                elif set(item) == {"synthetic"}:
                    item = {"kind": "synthetic", **(item["synthetic"] or {})}
            out.append(item)
        return out

    @field_validator("sources")
    @classmethod
    def _some_source(cls, v: list) -> list:
        if not v:
            raise ValueError(
                "at least one source is needed (e.g. `- kind: synthetic` or `- path: /data/videos`)"
            )
        return v

    @model_validator(mode="after")
    def _probe_needs_a_synthetic_source(self) -> PipelineConfig:
        if self.eval.grounding_probe_videos and self.synthetic_source() is None:
            raise ValueError(
                "eval.grounding_probe_videos draws new held-out videos from a synthetic source's generator, and "
                "no source is synthetic: set it to 0, or add a `- kind: synthetic` source"
            )
        return self

    def synthetic_source(self) -> SyntheticSource | None:
        """The first synthetic source (the one the eval's grounding probe draws from), if any."""
        return next((s for s in self.sources if isinstance(s, SyntheticSource)), None)

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    def stage_settings(self, stage: str) -> BaseModel:
        return getattr(self, stage)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set ingest.max_clip_seconds=20")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from e
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Apply `a.b=value` overrides to the raw mapping (values parsed as YAML scalars)."""
    if not overrides:
        return raw
    items = (
        [_parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.split("."), yaml.safe_load(v) if isinstance(v, str) else v) for k, v in overrides.items()]
    )
    for path, value in items:
        node: Any = raw
        for part in path[:-1]:
            if isinstance(node, list):  # a list of named entries (train.stages): pick the entry by its name
                node = _named_entry(node, part, path)
                continue
            if not isinstance(node.get(part, {}), dict | list):
                raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
            node = node.setdefault(part, {})
        if isinstance(node, list):
            raise ConfigError(
                f"--set {'.'.join(path)}: name a field of the {path[-1]!r} entry, not the entry"
            )
        node[path[-1]] = value
    return raw


def _named_entry(entries: list[Any], name: str, path: list[str]) -> dict[str, Any]:
    """`--set train.stages.sft.lr=...`: the entry of a list whose `name` is the key's next part."""
    named = [e for e in entries if isinstance(e, dict) and e.get("name") == name]
    if not named:
        known = [e.get("name") for e in entries if isinstance(e, dict)]
        raise ConfigError(f"--set {'.'.join(path)}: no entry named {name!r} (entries: {known})")
    return named[0]


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid pipeline config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see pipelines.yaml for the fields of each section)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    workspace: str | Path | None = None,
) -> PipelineConfig:
    """Read and validate a pipeline YAML (None: the built-in default), then overrides, then --workspace."""
    origin = "(built-in default)"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"pipeline config {p} does not exist (pass a YAML file, e.g. pipelines.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    if workspace is not None:
        raw["workspace"] = str(workspace)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin)) from None
