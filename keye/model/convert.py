"""Import Hugging Face weights: a Qwen3-MoE causal LM (Qwen3-30B-A3B layout) and/or a SigLIP vision tower.

Follows transformers' Qwen3MoeForCausalLM and SiglipVisionModel parameter layouts (per-expert gate/up/down weights
as on the Hub, or the fused gate_up_proj/down_proj tensors of transformers 5). Tensors are streamed shard by shard
into our checkpoint format, so a 30B model converts without holding it all in memory.

  convert_hf(qwen_dir, out)   -> LM weights from Qwen3-MoE, ViT and projector freshly initialised (or kept from an
                                 existing checkpoint at `out`); the DSA indexer starts at its init
  convert_hf(siglip_dir, out) -> replaces the vision tower of the checkpoint at `out` (projector kept when its shape
                                 still fits, else re-initialised); into an empty `out` it pairs SigLIP with a fresh
                                 LM of preset `base` (default tiny)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from keye.model.checkpoint import CONFIG, ShardWriter, read_config, safetensors_files
from keye.model.config import DSAConfig, LMConfig, ModelConfig, VisionConfig, preset
from keye.model.indexer import LightningIndexer
from keye.model.lm import LanguageModel
from keye.model.projector import Projector
from keye.model.rope import scale_section
from keye.model.vit import VisionTransformer
from keye.model.vlm import KeyeVL, init_module_weights

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _tensors(src: Path) -> Iterator[tuple[str, Tensor]]:
    for path in safetensors_files(src):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118
                yield key, f.get_tensor(key)


def lm_config_from_hf(hf: dict, dsa: DSAConfig | None = None) -> LMConfig:
    """Our LMConfig from a Qwen3-MoE config.json (transformers 4 or 5 spelling)."""
    if hf.get("model_type") != "qwen3_moe":
        raise ValueError(f"expected a qwen3_moe config, got model_type={hf.get('model_type')!r}")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise NotImplementedError(
            "dense-MLP layers (mlp_only_layers / decoder_sparse_step) are not supported"
        )
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise NotImplementedError("only default RoPE is supported")
    return LMConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=head_dim,
        num_experts=hf.get("num_experts", hf.get("num_local_experts")),
        top_k=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 1e-3)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        mrope_section=scale_section([16, 24, 24], head_dim // 2),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dsa=dsa or DSAConfig(),
    )


def vision_config_from_hf(hf: dict, rope_2d: bool = False) -> VisionConfig:
    """Our VisionConfig from a SigLIP config.json (a full SiglipModel config or its vision part)."""
    if hf.get("model_type") == "siglip":
        hf = hf.get("vision_config", {})
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise NotImplementedError(f"SigLIP activation {act!r} is not supported")
    patch = hf.get("patch_size", 16)
    return VisionConfig(
        hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072),
        patch_size=patch,
        in_channels=hf.get("num_channels", 3),
        pos_grid=hf.get("image_size", 224) // patch,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        rope_2d=rope_2d,
    )


def _fresh(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    init_module_weights(module)
    for k, v in module.state_dict().items():
        yield prefix + k, v


def _lm_tensors(src: Path, cfg: LMConfig, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
    """HF Qwen3-MoE tensors renamed to ours; per-expert matrices stacked per layer once all have been seen."""
    f = cfg.moe_intermediate_size
    pieces: dict[int, dict[tuple[int, str], Tensor]] = {}
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    for key, t in _tensors(src):
        m = _EXPERT.match(key)
        if m:
            layer, e, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            bucket = pieces.setdefault(layer, {})
            bucket[(e, kind)] = t
            if len(bucket) == 3 * cfg.num_experts:
                p = f"lm.layers.{layer}.mlp."
                for kind, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
                    stacked = torch.stack([bucket[(i, kind)].T for i in range(cfg.num_experts)])
                    yield p + ours, cast(stacked)
                del pieces[layer]
            continue
        m = _FUSED.match(key)
        if m:
            p = f"lm.layers.{m.group(1)}.mlp."
            if m.group(2) == "gate_up_proj":  # [E, 2F, H]: gate rows first, then up
                yield p + "w_gate", cast(t[:, :f, :].transpose(1, 2).contiguous())
                yield p + "w_up", cast(t[:, f:, :].transpose(1, 2).contiguous())
            else:  # down_proj [E, H, F]
                yield p + "w_down", cast(t.transpose(1, 2).contiguous())
            continue
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                yield "lm.lm_head.weight", cast(t)
            continue
        if key.startswith("model."):
            yield "lm." + key[len("model.") :], cast(t)
            continue
        raise KeyError(f"unexpected tensor {key} in {src}")
    if pieces:
        raise KeyError(f"incomplete expert weights for layers {sorted(pieces)} in {src}")


def _vision_tensors(src: Path, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
    for key, t in _tensors(src):
        if key.startswith("vision_model."):
            key = key[len("vision_model.") :]
        elif key.startswith(("text_model.", "logit_")):
            continue
        if key.startswith("head."):  # attention-pooling head: unused by a VLM
            continue
        yield "vision." + key, t.to(dtype) if dtype is not None else t


def _existing(out: Path) -> ModelConfig | None:
    return read_config(out) if (out / CONFIG).exists() else None


def _check_complete(cfg: ModelConfig, names: set[str]) -> None:
    with torch.device("meta"):
        expected = set(KeyeVL(cfg).state_dict())
    if cfg.lm.tie_word_embeddings:
        expected.discard("lm.lm_head.weight")
    missing, extra = expected - names, names - expected
    if missing or extra:
        raise KeyError(
            f"converted tensors do not match the model: missing {sorted(missing)[:8]}, extra {sorted(extra)[:8]}"
        )


def convert_hf(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    vision: VisionConfig | None = None,
    base: str = "tiny",
    image_token_id: int | None = None,
    vision_rope: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Convert a Hugging Face Qwen3-MoE LM or SigLIP vision directory into a checkpoint at `out_dir` (see module doc).

    vision: ViT shape to initialise next to a converted LM when `out_dir` has no checkpoint (default: SigLIP-400M).
    vision_rope: add Keye's 2D RoPE to a converted SigLIP (False keeps SigLIP's exact numerics).
    """
    src, out = Path(src_dir), Path(out_dir)
    hf = json.loads((src / "config.json").read_text())
    model_type = hf.get("model_type")
    prior = _existing(out)
    names: set[str] = set()

    if model_type == "qwen3_moe":
        lm = lm_config_from_hf(hf, prior.lm.dsa if prior else None)
        vis = prior.vision if prior else (vision or VisionConfig())
        tok = image_token_id if image_token_id is not None else (prior.image_token_id if prior else None)
        cfg = ModelConfig(
            lm=lm, vision=vis, image_token_id=tok if tok is not None else min(151655, lm.vocab_size - 1)
        )
        writer = ShardWriter(out, cfg, max_shard_bytes)
        try:
            for name, t in _lm_tensors(src, lm, dtype):
                writer.add(name, t)
                names.add(name)
            for i in range(lm.num_layers):  # the DSA indexer is Keye's addition: it starts at its init
                for name, t in _fresh(
                    LightningIndexer(lm.hidden_size, lm.dsa), f"lm.layers.{i}.self_attn.indexer."
                ):
                    writer.add(name, t.to(dtype) if dtype is not None else t)
                    names.add(name)
            _add_vision_side(writer, names, cfg, out if prior else None, prior, dtype)
            _check_complete(cfg, names)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    if model_type in ("siglip", "siglip_vision_model"):
        vis = vision_config_from_hf(hf, rope_2d=vision_rope)
        if prior is not None:
            cfg = ModelConfig.from_dict(prior.to_dict())
            cfg.vision = vis
        else:
            cfg = preset(base, image_token_id=image_token_id)
            cfg.vision = vis
        if image_token_id is not None:
            cfg.image_token_id = image_token_id
        cfg.validate()
        writer = ShardWriter(out, cfg, max_shard_bytes)
        try:
            for name, t in _vision_tensors(src, dtype):
                writer.add(name, t)
                names.add(name)
            if prior is not None:
                for name, t in _tensors(out):
                    if name.startswith("lm."):
                        writer.add(name, t)
                        names.add(name)
            else:
                for name, t in _fresh(LanguageModel(cfg.lm), "lm."):
                    if name == "lm.lm_head.weight" and cfg.lm.tie_word_embeddings:
                        continue
                    writer.add(name, t.to(dtype) if dtype is not None else t)
                    names.add(name)
            _add_projector(writer, names, cfg, out if prior else None, prior, dtype)
            _check_complete(cfg, names)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    raise ValueError(f"{src}: model_type {model_type!r} is neither qwen3_moe nor siglip")


def _add_projector(
    writer: ShardWriter,
    names: set[str],
    cfg: ModelConfig,
    prior_dir: Path | None,
    prior: ModelConfig | None,
    dtype,
) -> None:
    """Keep the prior projector when its shape still fits the new vision/LM widths, else initialise it."""
    fits = (
        prior is not None
        and prior.vision.hidden_size == cfg.vision.hidden_size
        and prior.lm.hidden_size == cfg.lm.hidden_size
        and prior.projector_hidden == cfg.projector_hidden
        and prior.center_visual_tokens == cfg.center_visual_tokens  # a centred projector has no output bias
    )
    if fits and prior_dir is not None:
        for name, t in _tensors(prior_dir):
            if name.startswith("projector."):
                writer.add(name, t)
                names.add(name)
        return
    proj = Projector(
        cfg.vision.hidden_size,
        cfg.lm.hidden_size,
        cfg.projector_hidden,
        cfg.vision.spatial_merge,
        center=cfg.center_visual_tokens,
    )
    for name, t in _fresh(proj, "projector."):
        writer.add(name, t.to(dtype) if dtype is not None else t)
        names.add(name)


def _add_vision_side(
    writer: ShardWriter,
    names: set[str],
    cfg: ModelConfig,
    prior_dir: Path | None,
    prior: ModelConfig | None,
    dtype,
) -> None:
    """ViT + projector next to a converted LM: kept from a prior checkpoint, else freshly initialised."""
    if prior_dir is not None:
        for name, t in _tensors(prior_dir):
            if name.startswith("vision."):
                writer.add(name, t)
                names.add(name)
    else:
        for name, t in _fresh(VisionTransformer(cfg.vision), "vision."):
            writer.add(name, t.to(dtype) if dtype is not None else t)
            names.add(name)
    _add_projector(writer, names, cfg, prior_dir, prior, dtype)
