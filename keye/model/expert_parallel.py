"""Expert parallelism for the MoE layers: each rank of an EP group owns num_experts / ep whole experts; the tokens
routed to an expert travel to its owner by all-to-all, go through the same grouped-GEMM experts as on one device
(keye.kernels.dispatch.moe_experts, one expert per received row), and come back by the reverse all-to-all, where
the router weights are applied (so the router's gradient stays on the token's rank). torchtitan's MoE does the same
dispatch / combine around its grouped GEMMs. The load-balancing statistics (tokens and router probability mass per
expert) are summed over the EP group, so the balance loss and the logged expert load are those of the EP group's
whole batch, equal to one process seeing all of it.

Autograd: the all-to-all's backward is the all-to-all with the splits swapped; the all-reduce of the statistics is
summed in the backward too (each rank's loss carries 1/ep of the shared balance loss, see `shard_experts`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from keye.kernels import dispatch


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:  # noqa: ANN001
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        back = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # noqa: ANN001
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:  # noqa: ANN001
    """Rows [sum(in_splits), ...] sent in rank order; returns the rows received [sum(out_splits), ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_reduce_sum(x: Tensor, group) -> Tensor:  # noqa: ANN001
    return _AllReduceSum.apply(x, group)


def dispatch_combine(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    num_experts: int,
    group,  # noqa: ANN001 - ProcessGroup
) -> Tensor:
    """y [T, H] = sum_k weight[t, k] * expert_{idx[t, k]}(x[t]) with the experts spread over `group` (local
    weights [E / ep, ...] of this rank's experts: rank r owns r * E/ep .. (r + 1) * E/ep - 1)."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    e_local = num_experts // ep
    t, hidden = x.shape
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, hence by owner rank
    token_of = order // k
    send = torch.bincount(flat // e_local, minlength=ep)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    in_splits, out_splits = send.tolist(), recv.tolist()
    rows = all_to_all(x[token_of], out_splits, in_splits, group)
    experts = torch.empty(sum(out_splits), dtype=flat.dtype, device=flat.device)
    dist.all_to_all_single(experts, flat[order].contiguous(), out_splits, in_splits, group=group)
    local = (experts - rank * e_local)[:, None]
    ones = torch.ones(local.shape, dtype=x.dtype, device=x.device)
    y_rows = dispatch.moe_experts(rows, local, ones, w_gate, w_up, w_down) if rows.shape[0] else rows * 0
    back = all_to_all(y_rows, in_splits, out_splits, group)
    weighted = back * topk_weight.reshape(-1)[order].to(x.dtype)[:, None]
    return x.new_zeros(t, hidden).index_add(0, token_of, weighted)


def group_balance_stats(probs: Tensor, topk_idx: Tensor, num_experts: int, group) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    """(Switch balance loss, int64 expert counts) over the EP group's tokens: E * sum_e f_e * P_e with f_e the
    group's routed share and P_e its mean router probability (keye.kernels.moe_reference.load_balance_loss on the
    concatenated batch)."""
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).to(probs.dtype)
    local = torch.cat([counts, probs.sum(dim=0), probs.new_tensor([probs.shape[0]])])
    total = all_reduce_sum(local, group)
    c, psum, n = total[:num_experts], total[num_experts : 2 * num_experts], total[-1].clamp(min=1)
    loss = num_experts * torch.sum(c.detach() / n.detach() * psum / n.detach())
    return loss, c.detach().round().to(torch.int64)


def shard_experts(model: nn.Module, mesh=None, group_balance: bool = True) -> nn.Module:  # noqa: ANN001
    """Keep only this rank's experts in every MoE layer of `model` and route through the mesh's group (`mesh`: a
    1-D DeviceMesh, the ep dim; default: a 1-D mesh over WORLD). The expert weights become DTensors sharded on
    dim 0 over the ep mesh, so torch.distributed.checkpoint saves each rank's experts with their global offsets
    and loads them on another ep (or into a plain model). group_balance: the balance loss each rank returns is
    the group's (a caller summing the ranks' losses weighs it by 1/ep); False: each rank's own batch's, as on
    one device (the trainer's rule: one balance loss per pack, whatever rank holds it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from keye.model.moe import MoE

    if mesh is None:
        mesh = init_device_mesh("cpu" if not torch.cuda.is_available() else "cuda", (dist.get_world_size(),))
    ep = mesh.size()
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        if m.cfg.num_experts % ep:
            raise ValueError(f"expert parallel degree {ep} does not divide {m.cfg.num_experts} experts")
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(m, name)
            shard = distribute_tensor(full.detach(), mesh, [Shard(0)], src_data_rank=None)
            setattr(m, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        m.ep_group = mesh.get_group()
        m.group_balance = group_balance
    return model


def local_experts(*weights: Tensor) -> tuple[Tensor, ...]:
    """This rank's expert weights as plain tensors (DTensor shards under EP; autograd flows back to the DTensor)."""
    return tuple(w.to_local() if hasattr(w, "to_local") else w for w in weights)
