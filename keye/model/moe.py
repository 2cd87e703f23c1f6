"""Sparse MoE feed-forward of Qwen3-MoE: softmax router, top-k with norm_topk_prob, SwiGLU experts, Switch-style
load-balancing loss; optional auxiliary-loss-free balancing bias (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2).

Expert weights are stored stacked in x @ W form (w_gate, w_up [E, H, F]; w_down [E, F, H]) so grouped-GEMM kernels
(keye.kernels.dispatch.moe_experts) can use them directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from keye.kernels import dispatch
from keye.kernels.moe_reference import MoEAux, load_balance_loss, route
from keye.model.config import LMConfig


class MoE(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = nn.Linear(h, e, bias=False)  # router
        self.w_gate = nn.Parameter(torch.empty(e, h, f))
        self.w_up = nn.Parameter(torch.empty(e, h, f))
        self.w_down = nn.Parameter(torch.empty(e, f, h))
        self.register_buffer("router_bias", torch.zeros(e), persistent=cfg.router_bias)
        self.ep_group = (
            None  # set by keye.model.expert_parallel.shard_experts: this rank holds E / ep experts
        )
        self.group_balance = True  # under EP: the balance loss of the EP group's batch (False: this rank's)
        self.cp = None  # keye.model.context_parallel.CPContext: x is this rank's rows of a pack split over cp
        self.reset_expert_parameters()

    def reset_expert_parameters(self, std: float = 0.02) -> None:
        for p in (self.w_gate, self.w_up, self.w_down):
            if p.device.type != "meta":
                nn.init.normal_(p, std=std)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        """x [T, H] -> (y [T, H], MoEAux)."""
        logits = self.gate(x)
        bias = self.router_bias if self.cfg.router_bias else None
        topk_idx, topk_weight, probs = route(logits, self.cfg.top_k, self.cfg.norm_topk_prob, bias)
        e = self.cfg.num_experts
        if self.ep_group is not None:
            from keye.model import expert_parallel as ep

            w = ep.local_experts(self.w_gate, self.w_up, self.w_down)
            y = ep.dispatch_combine(x, topk_idx, topk_weight, *w, e, self.ep_group)
            if self.group_balance and self.cp is None:
                balance, counts = ep.group_balance_stats(probs, topk_idx, e, self.ep_group)
                return y, MoEAux(load_balance_loss=balance, expert_counts=counts, router_probs=probs)
        else:
            y = dispatch.moe_experts(
                x, topk_idx, topk_weight.to(x.dtype), self.w_gate, self.w_up, self.w_down
            )
        if self.cp is not None:  # the pack's statistics: its rows are spread over the cp group
            return y, self._pack_stats(probs, topk_idx)
        aux = MoEAux(
            load_balance_loss=load_balance_loss(probs, topk_idx, e),
            expert_counts=torch.bincount(topk_idx.reshape(-1), minlength=e),
            router_probs=probs,
        )
        return y, aux

    def _pack_stats(self, probs: Tensor, topk_idx: Tensor) -> MoEAux:
        """Under context parallelism: the balance loss of the whole pack (statistics summed over the cp group,
        the padding rows left out), the same value on every cp rank; the counts are this rank's rows' (the
        trainer sums them over all ranks)."""
        from keye.model import expert_parallel as ep

        keep = self.cp.rows.to(probs.device) < self.cp.valid
        probs_v, idx_v = probs[keep], topk_idx[keep]
        balance, _ = ep.group_balance_stats(probs_v, idx_v, self.cfg.num_experts, self.cp.group)
        counts = torch.bincount(idx_v.reshape(-1), minlength=self.cfg.num_experts)
        return MoEAux(load_balance_loss=balance, expert_counts=counts, router_probs=probs)

    @torch.no_grad()
    def update_router_bias(self, counts: Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free step: raise the bias of under-loaded experts, lower over-loaded ones (sign rule)."""
        load = counts.float().to(self.router_bias.device)
        self.router_bias += rate * torch.sign(load.mean() - load)


def moe_param_counts(cfg: LMConfig) -> tuple[int, int]:
    """(total, active-per-token) parameters of one MoE block."""
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    router = cfg.hidden_size * cfg.num_experts
    return router + cfg.num_experts * per_expert, router + cfg.top_k * per_expert
