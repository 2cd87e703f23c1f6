"""Plain-torch reference of a token-choice MoE layer (softmax router, top-k, SwiGLU experts).

Follows Qwen3-MoE (transformers' Qwen3MoeSparseMoeBlock: softmax router, top-k, norm_topk_prob, Switch-style
load-balancing loss) and DeepSeek-V3's auxiliary-loss-free balancing (a per-expert bias that only affects which
experts are selected, never the mixing weights). The expert compute is the classic permute -> per-expert matmul ->
unpermute; it is the spec a grouped-GEMM kernel is tested against.

Weight layout (x @ W form): w_gate, w_up [E, H, F]; w_down [E, F, H].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MoEAux:
    """What the trainer needs besides the output: the balance loss and per-expert load (for logging and bias)."""

    load_balance_loss: Tensor  # scalar float32, Switch-style E * sum_e f_e * P_e (f_e sums to top_k)
    expert_counts: Tensor  # int64 [E], tokens routed to each expert (over all top-k slots)
    router_probs: Tensor  # float32 [T, E], softmax of the router logits


def route(
    router_logits: Tensor, top_k: int, norm_topk_prob: bool = True, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax router with top-k selection.

    Returns (topk_idx int64 [T, k], topk_weight float32 [T, k], probs float32 [T, E]) (float64 for float64 logits). `bias` [E] (aux-loss-free
    balancing) is added to the probabilities for the selection only; the weights are the unbiased probabilities,
    renormalised over the chosen k when norm_topk_prob.
    """
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(router_logits.to(acc), dim=-1)
    select = probs if bias is None else probs + bias.to(acc).detach()
    topk_idx = torch.topk(select, top_k, dim=-1).indices
    topk_weight = torch.gather(probs, 1, topk_idx)
    if norm_topk_prob:
        topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
    return topk_idx, topk_weight, probs


def load_balance_loss(probs: Tensor, topk_idx: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer balance loss as Qwen3-MoE computes it: E * sum_e (count_e / T) * mean_t probs[t, e]."""
    t = max(1, probs.shape[0])
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).to(probs.dtype)
    return num_experts * torch.sum(counts / t * probs.mean(dim=0))


def experts_reference(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor
) -> Tensor:
    """y[t] = sum_k topk_weight[t,k] * SwiGLU_{e=topk_idx[t,k]}(x[t]); permute -> per-expert matmul -> unpermute."""
    t_total, hidden = x.shape
    k = topk_idx.shape[1]
    flat_expert = topk_idx.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)  # permutation grouping (token, slot) pairs by expert
    token_of = order // k
    counts = torch.bincount(flat_expert, minlength=w_gate.shape[0]).tolist()
    xs = x[token_of]
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = xs[start : start + n]
        he = F.silu(xe @ w_gate[e]) * (xe @ w_up[e])
        outs.append(he @ w_down[e])
        start += n
    if not outs:
        return x.new_zeros(t_total, hidden)
    ys = torch.cat(outs) * topk_weight.reshape(-1)[order].to(x.dtype)[:, None]
    return x.new_zeros(t_total, hidden).index_add(0, token_of, ys)


def moe_reference(
    x: Tensor,
    router_logits: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    bias: Tensor | None = None,
) -> tuple[Tensor, MoEAux]:
    """Full MoE layer: x [T, H], router_logits [T, E] -> (y [T, H] in x.dtype, MoEAux).

    Routing as `route`, expert compute as `experts_reference`, balance loss as `load_balance_loss`.
    """
    topk_idx, topk_weight, probs = route(router_logits, top_k, norm_topk_prob, bias)
    y = experts_reference(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    num_experts = w_gate.shape[0]
    aux = MoEAux(
        load_balance_loss=load_balance_loss(probs, topk_idx, num_experts),
        expert_counts=torch.bincount(topk_idx.reshape(-1), minlength=num_experts),
        router_probs=probs,
    )
    return y, aux


__all__ = ["MoEAux", "experts_reference", "load_balance_loss", "moe_reference", "route"]
