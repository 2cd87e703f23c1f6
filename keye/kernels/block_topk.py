"""Triton block-shared DSA selection: the pooled indexer scores of each query block and their exact top-k.

Same contract as `block_selection.block_topk` (the spec): block b's mean indexer query and weights score the keys
of its sample up to its last row, and the top-k of those (ties to the smaller row) is listed in ascending order.
Reuses the per-token indexer's building blocks (keye/kernels/indexer_topk.py): `_index_scores_tile` for the
tensor-core scores of a [blocks, keys] tile, and `_radix_topk_row` for the exact selection of one row. Pooling
makes the scores `block` times cheaper than the per-token indexer's, and only one row per block is selected; the
torch version spent ~48 ms at 128K (block 64) in unfused relu / weighted-sum passes and a sort-based top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keye.kernels.block_selection import block_layout, own_block_rows, pooled_queries
from keye.kernels.indexer_topk import _index_scores_tile, _radix_topk_row


@triton.jit
def _block_scores_kernel(
    QB, KI, WB, BA, BE, OUT,
    b0, n_rows, col0, n_cols, n_keys, scale,
    stride_qb, stride_qh, stride_kt, stride_wb, stride_o,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """OUT[r, c] = pooled score of block b0 + r for key col0 + c, for tiles that touch some row's keys [BA, BE)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r_loc = pid_m * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (b0 + r_loc).to(tl.int64)
    c_loc = pid_n * BN + tl.arange(0, BN)
    cols = col0 + c_loc
    a = tl.load(BA + rows, mask=rmask, other=2147483647)
    e = tl.load(BE + rows, mask=rmask, other=0)
    if (col0 + pid_n * BN < tl.max(e)) and (col0 + pid_n * BN + BN > tl.min(a)):
        kmask = (cols < n_keys) & (c_loc < n_cols)
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + tl.arange(0, DI)[:, None],
            mask=kmask[None, :],
            other=0.0,
        )
        acc = _index_scores_tile(
            QB, WB, rows, rmask, kt, scale, stride_qb, stride_qh, stride_wb, H, DI, BM, BN
        )
        tl.store(
            OUT + r_loc[:, None].to(tl.int64) * stride_o + c_loc[None, :],
            acc,
            mask=rmask[:, None] & kmask[None, :],
        )


@triton.jit
def _block_select_kernel(
    SLAB, BA, BE, SCR, OUT_IDX, OUT_SCORE, b0, col0, stride_s,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr, SAMPLE: tl.constexpr,
):  # fmt: skip
    """One program per block row: exact top-k of its keys [BA, BE) = slab columns [BA - col0, BE - col0)."""
    r = tl.program_id(0)
    b = b0 + r
    a = tl.load(BA + b)
    e = tl.load(BE + b)
    base = SLAB + r.to(tl.int64) * stride_s - col0
    need = tl.minimum(e - a, TOPK)
    if need > 0:  # a sample's first block scores nothing (its rows stay -1)
        _radix_topk_row(
            base, base, a, e, 0, need, SCR + r.to(tl.int64) * CAP, OUT_IDX, OUT_SCORE, b.to(tl.int64),
            TOPK, KP, BLOCK, False, CAP, SAMPLE, False,
        )  # fmt: skip


def block_topk_triton(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    cu_seqlens: Tensor,
    topk: int,
    block: int,
    slab_bytes: int = 1 << 31,
    tile: tuple[int, int, int] = (64, 128, 8),
    select_block: int = 2048,
    sample: int = 1024,
) -> tuple[Tensor, Tensor]:
    """(bidx int32 [NB, topk + block], bstart int32 [NB+1]) as `block_selection.block_topk`; fp32 score slabs of
    at most `slab_bytes` per launch (rows x their key span), then one selection program per block."""
    t_total, h_i, d_i = q_idx.shape
    if d_i & (d_i - 1) or d_i < 16:
        raise ValueError(f"indexer dim {d_i} must be a power of two >= 16")
    bstart = block_layout(cu_seqlens, block)
    nb = bstart.numel() - 1
    dev = q_idx.device
    out = torch.full((nb, topk), -1, dtype=torch.int32, device=dev)
    scores = torch.full((nb, topk), float("-inf"), dtype=torch.float32, device=dev)
    own = own_block_rows(bstart.to(dev), block)
    if nb == 0 or topk == 0:
        return torch.cat([out, own], 1), bstart
    qb, wb, ba, be = pooled_queries(q_idx, w, cu_seqlens, bstart)
    k_idx = k_idx.to(qb.dtype).contiguous()
    kp = triton.next_power_of_2(topk)
    cap = 4 * kp
    bm, bn, warps = tile
    host_a, host_e = ba.tolist(), be.tolist()
    scratch = torch.empty((0, cap), device=dev, dtype=torch.int64)
    r0 = 0
    while r0 < nb:
        r1, col0 = r0 + 1, host_a[r0]
        while r1 < nb and (r1 + 1 - r0) * (host_e[r1] - min(col0, host_a[r1])) * 4 <= slab_bytes:
            col0 = min(col0, host_a[r1])
            r1 += 1
        n_rows, n_cols = r1 - r0, max(host_e[r0:r1]) - col0
        if n_cols <= 0:  # only first blocks of samples: nothing earlier to score
            r0 = r1
            continue
        slab = torch.empty((n_rows, n_cols), device=dev, dtype=torch.float32)
        _block_scores_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
            qb, k_idx, wb, ba, be, slab, r0, n_rows, col0, n_cols, t_total, d_i**-0.5,
            qb.stride(0), qb.stride(1), k_idx.stride(0), wb.stride(0), slab.stride(0),
            H=h_i, DI=d_i, BM=bm, BN=bn, num_warps=warps,
        )  # fmt: skip
        if scratch.shape[0] < n_rows:
            scratch = torch.empty((n_rows, cap), device=dev, dtype=torch.int64)
        _block_select_kernel[(n_rows,)](
            slab, ba, be, scratch, out, scores, r0, col0, slab.stride(0),
            TOPK=topk, KP=kp, BLOCK=select_block, CAP=cap, SAMPLE=sample, num_warps=8,
        )  # fmt: skip
        r0 = r1
    return torch.cat([out, own], 1), bstart


__all__ = ["block_topk_triton"]
