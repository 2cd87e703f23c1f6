"""Keye-VL-2.0-style model in plain PyTorch: SigLIP-style NaViT ViT + projector + Qwen3-MoE LM with GQA DeepSeek
Sparse Attention and M-RoPE.

Public API
----------
    from keye.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
    model = build_model("tiny", vocab_size=len(tokenizer), image_token_id=tok.image_id)
    logits = model(input_ids=ids).logits          # ids (B, S) -> (B, S, V); text only

Packed training forward (every tensor on the model's device):
    out = model(
        input_ids=...,         # int64 [T]      all samples of the pack, concatenated
        position_ids=...,      # int64 [3, T]   M-RoPE (t, h, w); keye.model.rope.mrope_positions per sample
        cu_seqlens=...,        # int32 [B+1]    sample boundaries; no attention crosses them
        labels=...,            # int64 [T]      ALIGNED with input_ids (like input_ids, -100 = no loss); the model
                               #                shifts inside each sample: row t is trained to predict labels[t+1]
        pixel_patches=...,     # float [N, 3*14*14]  patches of every frame, raster order per frame, (C, P, P)
        patch_grids=...,       # int32 [n_frames, 3] (t=1, h_patches, w_patches), frames in order of appearance
        vision_cu_seqlens=..., # int32 [n_frames+1]  (optional; checked against patch_grids)
    )
    out.loss = out.lm_loss + router_aux_loss_coef * out.aux_loss + out.indexer_loss (when any layer is DSA)
    Also out.expert_counts [layers, E], out.num_tokens. logits are not materialised when labels are given
    (pass return_logits=True to get them).
Each frame of h x w patches becomes (h/2)*(w/2) image_token_id rows (keye.model.vision_tokens.frame_tokens), filled
in order by the projected visual tokens.

Attention modes per layer: `model.set_attention_mode("dense" | "dsa_warmup" | "dsa", layers=None)`; in
dsa_warmup train only `model.indexer_parameters()` (DeepSeek-V3.2: main model frozen), in dsa train everything
(the indexer input is detached inside, so the indexer learns only from out.indexer_loss).
MoE aux-loss-free balancing (config lm.router_bias=True): after each step call
`layer.mlp.update_router_bias(out.expert_counts[i], rate)` for every layer i.
Generation: keye.model.generate.generate. Conversion from Hugging Face: keye.model.convert.convert_hf.
Heavy kernels (prefill/training attention, indexer top-k and KL, MoE experts, decode steps) come from
keye.kernels.dispatch (KEYE_KERNELS=reference|triton|auto). Parameter counts: count_lm_params(model).
"""

from __future__ import annotations

import torch

from keye.model.checkpoint import load_checkpoint, save_checkpoint
from keye.model.config import PRESETS, DSAConfig, LMConfig, ModelConfig, VisionConfig, preset
from keye.model.vlm import KeyeVL, ModelOutput


def build_model(
    config: ModelConfig | str = "tiny",
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> KeyeVL:
    """A freshly initialised model from a config or preset name (vocab from the tokenizer at build time).

    device="meta" builds the shape only (no memory), e.g. to count the parameters of `30b-a3b`.
    """
    if isinstance(config, str):
        cfg = preset(config, vocab_size=vocab_size, image_token_id=image_token_id)
    else:
        cfg = ModelConfig.from_dict(config.to_dict())
        if vocab_size is not None:
            cfg.lm.vocab_size = vocab_size
        if image_token_id is not None:
            cfg.image_token_id = image_token_id
        cfg.validate()
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = KeyeVL(cfg)
    model.init_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model


def count_lm_params(model: KeyeVL) -> dict[str, int]:
    """LM parameters: total and active per token (top-k experts only), both without the DSA indexer (Keye's
    addition, reported separately) so they compare with Qwen3-30B-A3B's 30.5B / 3.35B."""
    cfg = model.config.lm
    total = active = indexer = 0
    seen: set[int] = set()
    for name, p in model.lm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if ".indexer." in name:
            indexer += n
            continue
        total += n
        if name.endswith(("w_gate", "w_up", "w_down")):
            active += n * cfg.top_k // cfg.num_experts
        else:
            active += n
    vision = sum(p.numel() for p in model.vision.parameters()) + sum(
        p.numel() for p in model.projector.parameters()
    )
    return {"total": total, "active": active, "indexer": indexer, "vision_and_projector": vision}


__all__ = [
    "PRESETS",
    "DSAConfig",
    "KeyeVL",
    "LMConfig",
    "ModelConfig",
    "ModelOutput",
    "VisionConfig",
    "build_model",
    "count_lm_params",
    "load_checkpoint",
    "preset",
    "save_checkpoint",
]
