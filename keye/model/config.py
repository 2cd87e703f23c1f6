"""Model configuration: plain dataclasses with JSON round-trip and the three presets of the project.

Shapes follow Qwen3-30B-A3B (LM: Qwen3-MoE config.json), SigLIP-so400m-patch14 (ViT) and Keye-VL-1.5/2.0
(projector, M-RoPE sections, DSA indexer settings from DeepSeek-V3.2-Exp). See docs REFERENCE.md sections 1-2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ATTENTION_MODES = ("dense", "dsa_warmup", "dsa")
INDEXER_DTYPES = ("bf16", "fp8")


@dataclass
class VisionConfig:
    """SigLIP-style ViT over native-resolution frames (NaViT packing)."""

    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    in_channels: int = 3
    pos_grid: int = (
        27  # learned position table is pos_grid x pos_grid, bilinearly resized to each frame's grid
    )
    layer_norm_eps: float = 1e-6
    rope_2d: bool = True  # Keye adds 2D RoPE on top of SigLIP; False reproduces SigLIP numerics exactly
    rope_theta: float = 10000.0
    spatial_merge: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class DSAConfig:
    """Lightning indexer + top-k of DeepSeek Sparse Attention, adapted to GQA."""

    index_heads: int = 16
    index_dim: int = 64
    topk: int = 2048
    block: int = 1024  # query block of the chunked reference path (slab block x L)
    # token: one top-k set per query token (DeepSeek-V3.2); block: one set per `selection_block` query tokens from
    # their pooled indexer query (NSA / MoBA style; keye/kernels/block_selection.py), a compute-bound sparse kernel
    selection: str = "token"
    selection_block: int = 64
    # fp8: token selection scores e4m3 queries/keys with per-token scales (keye/kernels/indexer_fp8.py) and the decode
    # cache keeps the indexer keys as e4m3 rows + a float32 scale each; the indexer's KL stays in the model dtype.
    # Block selection ignores it (bf16 pooled queries, bf16 key cache)
    indexer_dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.selection not in ("token", "block"):
            raise ValueError(f"dsa.selection must be 'token' or 'block', got {self.selection!r}")
        if self.selection_block < 1:
            raise ValueError(f"dsa.selection_block must be >= 1, got {self.selection_block}")
        if self.indexer_dtype not in INDEXER_DTYPES:
            raise ValueError(f"dsa.indexer_dtype must be 'bf16' or 'fp8', got {self.indexer_dtype!r}")

    @property
    def fp8_indexer(self) -> bool:
        """Whether token selection (prefill top-k and the decode key cache) runs the FP8 indexer."""
        return self.indexer_dtype == "fp8" and self.selection == "token"


@dataclass
class LMConfig:
    """Qwen3-MoE decoder with M-RoPE, per-layer attention mode (dense | dsa_warmup | dsa)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_layers: int = 48
    num_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    top_k: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 1e-3
    router_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3), selection only
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 262_144
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    attention_modes: list[str] = field(default_factory=list)  # per layer; empty = all "dense"
    dsa: DSAConfig = field(default_factory=DSAConfig)

    def mode_of(self, layer: int) -> str:
        return self.attention_modes[layer] if self.attention_modes else "dense"


@dataclass
class ModelConfig:
    """Vision tower + projector + LM; `image_token_id` marks the placeholder rows replaced by visual tokens."""

    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    projector_hidden: int = 0  # 0 = 4 * vision.hidden_size (Keye: Linear(4D, 4D) -> GELU -> Linear(4D, H))
    center_visual_tokens: bool = False  # subtract each frame's mean visual token (keye.model.projector)
    preset: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        lm = self.lm
        if lm.num_heads % lm.num_kv_heads:
            raise ValueError(f"num_heads {lm.num_heads} must be a multiple of num_kv_heads {lm.num_kv_heads}")
        if sum(lm.mrope_section) * 2 != lm.head_dim:
            raise ValueError(f"mrope_section {lm.mrope_section} must sum to head_dim/2 = {lm.head_dim // 2}")
        if lm.top_k > lm.num_experts:
            raise ValueError(f"top_k {lm.top_k} exceeds num_experts {lm.num_experts}")
        if lm.attention_modes and len(lm.attention_modes) != lm.num_layers:
            raise ValueError(
                f"attention_modes has {len(lm.attention_modes)} entries for {lm.num_layers} layers"
            )
        for m in lm.attention_modes:
            if m not in ATTENTION_MODES:
                raise ValueError(f"attention mode {m!r} not in {ATTENTION_MODES}")
        lm.dsa.__post_init__()  # fields set after construction (the trainer's) are checked here too
        if lm.dsa.index_dim % 4:
            raise ValueError("dsa.index_dim must be a multiple of 4 (RoPE on half of it)")
        v = self.vision
        if v.hidden_size % v.num_heads or (v.rope_2d and v.head_dim % 4):
            raise ValueError("vision hidden_size must split into heads with head_dim a multiple of 4")
        if not 0 <= self.image_token_id < lm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside vocab of size {lm.vocab_size}")

    def set_attention_mode(self, mode: str, layers: list[int] | None = None) -> None:
        """Switch some (default: all) layers to `mode`; the modules read the config at forward time."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} not in {ATTENTION_MODES}")
        modes = list(self.lm.attention_modes) or ["dense"] * self.lm.num_layers
        for i in range(self.lm.num_layers) if layers is None else layers:
            modes[i] = mode
        self.lm.attention_modes = modes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        lm_data = dict(data.get("lm", {}))
        dsa = DSAConfig(**_known(DSAConfig, lm_data.pop("dsa", {})))
        lm = LMConfig(**_known(LMConfig, lm_data), dsa=dsa)
        vision = VisionConfig(**_known(VisionConfig, data.get("vision", {})))
        rest = {k: v for k, v in _known(cls, data).items() if k not in ("lm", "vision")}
        return cls(lm=lm, vision=vision, **rest)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        p = Path(path_or_text)
        text = p.read_text() if p.suffix == ".json" or p.exists() else str(path_or_text)
        return cls.from_dict(json.loads(text))


def _known(kind: type, data: dict[str, Any]) -> dict[str, Any]:
    """Keep only the fields `kind` declares; an unknown key is an error (typos must not pass silently)."""
    names = {f.name for f in fields(kind)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    return dict(data)


def preset(name: str, vocab_size: int | None = None, image_token_id: int | None = None) -> ModelConfig:
    """`tiny` (CPU, minutes), `small` (one H200 at 256K packed context) or `30b-a3b` (the real shape).

    vocab_size / image_token_id come from the tokenizer at build time; defaults are Qwen3's.
    """
    if name == "tiny":
        lm = LMConfig(
            vocab_size=vocab_size or 151936,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            num_experts=4,
            top_k=2,
            moe_intermediate_size=128,
            mrope_section=[4, 6, 6],
            rope_theta=10000.0,
            max_position_embeddings=32768,
            dsa=DSAConfig(index_heads=2, index_dim=16, topk=64, block=256),
        )
        vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, pos_grid=16)
    elif name == "small":
        lm = LMConfig(
            vocab_size=vocab_size or 151936,
            hidden_size=1024,
            num_layers=12,
            num_heads=16,
            num_kv_heads=2,
            head_dim=64,
            num_experts=32,
            top_k=4,
            moe_intermediate_size=512,
            mrope_section=[8, 12, 12],
            rope_theta=8_000_000.0,
            dsa=DSAConfig(index_heads=8, index_dim=64, topk=2048, block=1024),
        )
        vision = VisionConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536)
    elif name == "30b-a3b":
        lm = LMConfig(vocab_size=vocab_size or 151936)
        vision = VisionConfig()
    else:
        raise ValueError(f"unknown preset {name!r}; choose tiny, small or 30b-a3b")
    tok = image_token_id if image_token_id is not None else min(151655, lm.vocab_size - 1)
    # tiny is trained from scratch on mostly-background frames: centred visual tokens (see keye.model.projector)
    return ModelConfig(
        lm=lm, vision=vision, image_token_id=tok, preset=name, center_visual_tokens=name == "tiny"
    )


PRESETS = ("tiny", "small", "30b-a3b")
