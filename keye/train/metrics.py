"""Training metrics that need care: model FLOPs (sparse attention counted as sparse), MFU, expert load, DSA indexer
health (KL and the share of the dense attention mass the top-k captures).

FLOP conventions follow PaLM / Megatron MFU (6 x active matmul parameters per token, attention counted apart,
recomputation not counted) and the DSA formulas of REFERENCE.md section 2 (forward 2*H*k*(Dqk+Dv), backward
2*H*k*(3Dqk+2Dv) per query over its k keys; dense attention is the same with k = the visible keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from keye.model.config import LMConfig

H200_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA datasheet), FLOP/s


def lm_active_matmul_params(cfg: LMConfig) -> int:
    """Matmul parameters one token touches in the LM body (attention projections, router, top-k experts),
    without embeddings, lm_head and the DSA indexer (counted separately)."""
    h, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h
    moe = h * cfg.num_experts + cfg.top_k * 3 * h * cfg.moe_intermediate_size
    return cfg.num_layers * (attn + moe)


def _visible_keys(lengths: Sequence[int], topk: int | None) -> float:
    """Sum over queries of the keys each attends to (causal, per sample), capped at topk when sparse."""
    total = 0.0
    for n in lengths:
        n = int(n)
        if topk is None or n <= topk:
            total += n * (n + 1) / 2
        else:
            total += topk * (topk + 1) / 2 + (n - topk) * topk
    return total


def training_flops(
    cfg: LMConfig,
    seq_lengths: Sequence[int],
    modes: Sequence[str] | None = None,
    loss_tokens: int | None = None,
) -> float:
    """Model FLOPs of one forward + backward over a pack with these sample lengths.

    `modes` per layer (default: the config's); a `dsa` layer counts attention over top-k keys plus the indexer's
    dense causal scores (forward only: selection has no backward) and its KL over the selected set; a `dsa_warmup`
    layer counts dense attention plus dense indexer scores and KL; `loss_tokens` rows go through lm_head (default:
    all rows).
    """
    t = float(sum(int(n) for n in seq_lengths))
    modes = list(modes) if modes is not None else [cfg.mode_of(i) for i in range(cfg.num_layers)]
    hq, d = cfg.num_heads, cfg.head_dim
    hi, di = cfg.dsa.index_heads, cfg.dsa.index_dim
    flops = 6.0 * lm_active_matmul_params(cfg) * t
    flops += 6.0 * cfg.hidden_size * cfg.vocab_size * (t if loss_tokens is None else loss_tokens)
    dense_pairs = _visible_keys(seq_lengths, None)
    sparse_pairs = _visible_keys(seq_lengths, cfg.dsa.topk)
    idx_proj = 6.0 * cfg.hidden_size * (hi * di + di + hi) * t
    for mode in modes:
        pairs = sparse_pairs if mode == "dsa" else dense_pairs
        flops += 2.0 * hq * pairs * (2 * d) + 2.0 * hq * pairs * (3 * d + 2 * d)  # fwd + bwd
        if mode != "dense":
            kl_pairs = sparse_pairs if mode == "dsa" else dense_pairs
            flops += idx_proj
            flops += 2.0 * hi * di * dense_pairs if mode == "dsa" else 0.0  # scores for the selection
            flops += kl_pairs * (2.0 * hq * d + 3 * 2.0 * hi * di)  # KL: target probs + index logits fwd/bwd
    return flops


def mfu(flops: float, seconds: float, peak: float = H200_BF16_PEAK, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
    return flops / max(seconds, 1e-12) / (peak * n_devices)


def expert_load(expert_counts: Tensor) -> dict[str, float]:
    """Expert load balance from [layers, E] token counts: max/mean per layer, worst layer and mean over layers."""
    c = expert_counts.detach().float()
    ratio = c.max(dim=-1).values / c.mean(dim=-1).clamp_min(1e-9)
    return {"expert_load_max_over_mean": float(ratio.max()), "expert_load_mean_ratio": float(ratio.mean())}


@torch.no_grad()
def topk_mass_share(
    q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, w: Tensor, topk: int, scale: float
) -> float:
    """Share of the dense attention mass (head-summed, per query, one causal sample) that falls on the indexer's
    top-k keys: 1.0 means the sparse layer sees everything the dense one would. q [L, Hq, D], k [L, Hkv, D],
    q_idx [L, H_I, D_I], k_idx [L, D_I], w [L, H_I]. Meant for a probe sample of modest length (L x L in memory)."""
    n, hq, _ = q.shape
    g = hq // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    p = logits.masked_fill(~causal, -math.inf).softmax(-1).sum(0)
    p = p / p.sum(-1, keepdim=True)
    scores = torch.einsum("qhd,kd->qhk", q_idx.float(), k_idx.float()).relu()
    index = torch.einsum("qhk,qh->qk", scores, w.float()).masked_fill(~causal, -math.inf)
    kk_top = min(topk, n)
    sel = index.topk(kk_top, dim=-1).indices
    captured = p.gather(-1, sel).sum(-1)  # masked (future) keys carry zero mass, so padding selections add 0
    return float(captured.mean())
