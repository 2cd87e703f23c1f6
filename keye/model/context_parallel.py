"""Context parallelism for long packed sequences: the T rows of a pack are split over the cp ranks of a group, each
rank runs the whole model on its rows, and attention sees every earlier key of the sample through an all-gather of
K, V (and the DSA indexer keys) with autograd (the backward sums the key gradients over the group and keeps the
local rows).

Causal load balance: the pack is cut into 2 * cp equal chunks and rank r takes chunks r and 2cp-1-r (an early and a
late chunk: every rank attends about the same number of query-key pairs; Megatron-LM / torchtitan's split). Rows
keep their global ids, so cu_seqlens stays the pack's and a chunk may start or end inside a sample.

Attention of a rank's query rows over the gathered keys gives each row exactly the keys, the top-k set and the KL
term it gets on one device, through what keye.kernels.dispatch picks for each part:
- dense causal: torch SDPA per (chunk, sample) segment with a lower-right causal mask (the queries are the end of
  their key span; FlashAttention on GPU), on every device;
- indexer top-k and indexer KL: the Triton kernels with a query-row offset, one call per contiguous chunk (its query
  rows only, every gathered key), on CUDA or under KEYE_KERNELS=triton;
- sparse attention: the dispatched kernel with global key ids (it takes fewer query rows than keys).
Otherwise (CPU under auto, and KEYE_KERNELS=reference everywhere) the torch reference blocks of
keye.kernels.dsa_reference run per segment with the queries placed at their offset in the sample: the spec.
The indexer KL of a rank is its share of the pack's mean (divided by the global T), so the ranks' losses add up to
the single-device loss. Decode is untouched (no cp context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from keye.kernels import dispatch
from keye.kernels import dsa_reference as ref
from keye.kernels.dense_sdpa import suffix_causal_sdpa


def balanced_rows(total: int, cp: int, rank: int) -> Tensor:
    """Global row ids of `rank`: chunks rank and 2cp-1-rank of 2cp equal chunks (total % (2 cp) == 0)."""
    if total % (2 * cp):
        raise ValueError(
            f"context parallel: {total} rows do not split into {2 * cp} equal chunks; pad the pack"
        )
    c = total // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])


@dataclass
class CPContext:
    """What attention needs to see the whole pack: the group, the pack's cu_seqlens and every rank's rows."""

    group: object  # ProcessGroup
    cu_seqlens: Tensor  # int32 [B+1] of the whole pack
    rows: Tensor  # int64 [T / cp]: this rank's global row ids (ascending)
    total: int
    valid: int = -1  # rows before the padding (the pack's own rows; -1: all of them)

    def __post_init__(self) -> None:
        if self.valid < 0:
            self.valid = self.total

    @classmethod
    def balanced(cls, cu_seqlens: Tensor, group=None, valid: int | None = None) -> CPContext:  # noqa: ANN001
        """`valid`: the pack's rows when it was padded (pad_rows) to split evenly; the padding rows are one extra
        sample at the end, which attention keeps to itself and the indexer KL and MoE statistics leave out."""
        group = group or dist.group.WORLD
        total = int(cu_seqlens[-1])
        rows = balanced_rows(total, dist.get_world_size(group), dist.get_rank(group))
        return cls(group, cu_seqlens, rows, total, total if valid is None else int(valid))

    def all_rows(self) -> Tensor:
        cp = dist.get_world_size(self.group)
        return torch.cat([balanced_rows(self.total, cp, r) for r in range(cp)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cpc: CPContext) -> Tensor:  # noqa: ANN001
        ctx.cpc = cpc
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(cpc.group))]
        dist.all_gather(parts, x.contiguous(), group=cpc.group)
        full = x.new_empty((cpc.total, *x.shape[1:]))
        full[cpc.all_rows()] = torch.cat(parts)
        return full

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.cpc.group)  # every rank's queries used these keys
        return grad[ctx.cpc.rows], None


def pad_rows(total: int, cp: int) -> int:
    """Rows to append so a pack of `total` rows splits into 2 * cp equal chunks."""
    return -total % (2 * cp)


def gather_rows(x: Tensor, cpc: CPContext) -> Tensor:
    """[T/cp, ...] local rows -> [T, ...] the whole pack in global row order (autograd: sum, then local rows)."""
    return _GatherRows.apply(x, cpc)


def _chunks(cpc: CPContext) -> list[tuple[int, int, int]]:
    """(local start, global start c0, global end c1): the contiguous runs of this rank's rows."""
    rows = cpc.rows.tolist()
    out = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        out.append((i, rows[i], rows[j] + 1))
        i = j + 1
    return out


def _segments(cpc: CPContext) -> list[tuple[int, int, int, int]]:
    """(local start, sample start s0, query start u0, query end u1): this rank's rows [u0, u1) of one sample,
    at local offset `local start`; their keys are rows s0..u1-1."""
    out = []
    bounds = ref.sample_bounds(cpc.cu_seqlens)
    for i, c0, c1 in _chunks(cpc):
        for s0, s1 in bounds:
            u0, u1 = max(c0, s0), min(c1, s1)
            if u0 < u1:
                out.append((i + u0 - c0, s0, u0, u1))
    return out


def _at_offset(x: Tensor, before: int) -> Tensor:
    """Rows of x placed after `before` zero rows (the sample's earlier rows, which belong to other ranks)."""
    return F.pad(x, (0, 0) * (x.dim() - 1) + (before, 0))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cpc: CPContext,
    scale: float,
    mode: str,
    topk: int,
    block: int,
    q_idx: Tensor | None = None,
    k_idx: Tensor | None = None,
    w: Tensor | None = None,
    want_kl: bool = False,
    covers: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(o [T/cp, Hq, D], this rank's share of the indexer KL or None) for the local query rows; k, v, k_idx local
    too (gathered here). Same semantics as keye.model.attention.Attention's token-selection modes; which
    implementation runs each part: the module docstring."""
    kf, vf = gather_rows(k, cpc), gather_rows(v, cpc)
    kif = gather_rows(k_idx, cpc) if k_idx is not None else None
    segs = _segments(cpc)
    g = q.shape[1] // k.shape[1]
    blk = max(1, block // g)
    sparse = mode == "dsa" and (not covers or want_kl)
    indices = None
    topk_fast = dispatch.fast("indexer_topk", q) if sparse else None
    if topk_fast is not None:  # per chunk: its query rows at their global offset, every gathered key
        parts = []
        for lo, c0, c1 in _chunks(cpc):
            sl = slice(lo, lo + c1 - c0)
            idx, _ = topk_fast(
                q_idx[sl].detach(), kif.detach(), w[sl].detach(), cpc.cu_seqlens, topk, block, q_row0=c0
            )
            parts.append(idx)
        indices = torch.cat(parts)
    elif sparse:  # the indexer's top-k of every local query over the gathered keys (global row ids)
        indices = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
        with torch.no_grad():
            for lo, s0, u0, u1 in segs:
                qi = _at_offset(q_idx[lo : lo + u1 - u0].detach(), u0 - s0)
                wi = _at_offset(w[lo : lo + u1 - u0].detach(), u0 - s0)
                ki = kif[s0:u1].detach()
                for q0 in range(u0 - s0, u1 - s0, block):
                    q1 = min(q0 + block, u1 - s0)
                    vals, cols = ref.topk_lowest_index_ties(
                        ref.indexer_scores_block(qi, ki, wi, 0, q0, q1), topk
                    )
                    rows = slice(lo + q0 - (u0 - s0), lo + q1 - (u0 - s0))
                    indices[rows] = torch.where(torch.isfinite(vals), cols + s0, -1).to(torch.int32)
    if mode == "dsa" and not covers:  # the kernels take fewer query rows than keys (indices: global rows)
        o, _ = dispatch.sparse_attention(q, kf, vf, indices, scale)
    elif dispatch.fast("dense_attention", q) is not None:  # SDPA: the queries are the end of their key span
        o = torch.cat(
            [suffix_causal_sdpa(q[lo : lo + u1 - u0], kf[s0:u1], vf[s0:u1], scale) for lo, s0, u0, u1 in segs]
        )
    else:
        parts = []
        grad = q.requires_grad or kf.requires_grad or vf.requires_grad
        for lo, s0, u0, u1 in segs:
            qv = _at_offset(q[lo : lo + u1 - u0], u0 - s0)
            for q0 in range(u0 - s0, u1 - s0, blk):
                q1 = min(q0 + blk, u1 - s0)
                ob, _ = ref._maybe_checkpoint(
                    ref._dense_block, qv, kf[s0:u1], vf[s0:u1], 0, q0, q1, scale, grad=grad
                )
                parts.append(ob)
        o = torch.cat(parts).to(q.dtype)
    kl = None
    kl_fast = dispatch.fast("indexer_kl", q) if want_kl else None
    if kl_fast is not None:  # per chunk, its rows of the pack's own samples (not the padding)
        kl = q_idx.new_zeros((), dtype=torch.float32)
        for lo, c0, c1 in _chunks(cpc):
            n = min(c1, cpc.valid) - c0
            if n <= 0:
                continue
            sl = slice(lo, lo + n)
            ib = None if indices is None else indices[sl]
            part = kl_fast(
                q[sl].detach(),
                kf.detach(),
                cpc.cu_seqlens,
                scale,
                q_idx[sl],
                kif,
                w[sl],
                ib,
                block,
                q_row0=c0,
            )
            kl = kl + part * (n / cpc.valid)
    elif want_kl:
        kl = q_idx.new_zeros((), dtype=torch.float32)
        for lo, s0, u0, u1 in segs:
            if s0 >= cpc.valid:  # the padding sample: no KL term
                continue
            n = u1 - u0
            qv, qi = _at_offset(q[lo : lo + n].detach(), u0 - s0), _at_offset(q_idx[lo : lo + n], u0 - s0)
            wi = _at_offset(w[lo : lo + n], u0 - s0)
            for q0 in range(u0 - s0, u1 - s0, blk):
                q1 = min(q0 + blk, u1 - s0)
                ib = None
                if indices is not None:
                    ib = indices[lo + q0 - (u0 - s0) : lo + q1 - (u0 - s0)]
                    ib = torch.where(ib >= 0, ib - s0, -1)
                kl = kl + ref._kl_block(qv, kf[s0:u1].detach(), qi, kif[s0:u1], wi, ib, 0, q0, q1, scale)
        kl = kl / cpc.valid
    return o, kl


def set_context(model: torch.nn.Module, cpc: CPContext | None) -> None:
    """Point every attention and MoE module of `model` (and a KeyeVL itself, which then takes this rank's rows of
    the pack it is given) at `cpc` (None: back to whole packs on one device)."""
    from keye.model.attention import Attention
    from keye.model.moe import MoE
    from keye.model.vlm import KeyeVL

    for m in model.modules():
        if isinstance(m, Attention | MoE | KeyeVL):
            m.cp = cpc
