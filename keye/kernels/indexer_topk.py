"""Triton lightning-indexer scores with exact top-k selection (DSA), for packed causal batches.

Follows DeepSeek-V3.2-Exp's lightning indexer (I[t,s] = sum_j w[t,j] relu(q_j . k_s / sqrt(D_I))) and the
radix-select idea of TileLang's DSA `topk_selector` example, written here in Triton. Spec:
`dsa_reference.indexer_topk_reference` (sorted by score descending, ties to the smaller index, -1/-inf padding).

Two kernels per chunk of query rows: (1) tensor-core scores of the chunk against its key window (a bounded
[chunk, window] fp32 slab, never L x L); (2) one program per row picks a threshold at or below the k-th score
(proposed by a strided sample, confirmed by one counting pass; a 4 x 8-bit radix select on order-preserving keys
when no proposal fits), compacts the keys above it and sorts them (score desc, index asc) to keep the first k.
Measured on an H200 at 128K (bench/RESULTS.md "## dsa"): scores 56 ms, selection ~240 ms: the selection is the
part to make faster next.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _indexer_scores_kernel(
    QI, KI, W, ROW_START, OUT,
    row0, n_rows, col0, n_cols, n_keys, scale,
    stride_qt, stride_qh, stride_kt, stride_wt, stride_o,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """OUT[r, c] = I[row0 + r, col0 + c] for the tiles that touch some row's causal window (others untouched)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r_loc = pid_m * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    c_loc = pid_n * BN + tl.arange(0, BN)
    cols = col0 + c_loc
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid_m * BM + BM, n_rows) - 1  # last row of the block (keys <= it)
    if (col0 + pid_n * BN <= hi) and (col0 + pid_n * BN + BN > lo):
        offs_d = tl.arange(0, DI)
        kmask = (cols < n_keys) & (c_loc < n_cols)
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0
        )
        acc = tl.zeros([BM, BN], tl.float32)
        for j in range(H):
            qj = tl.load(
                QI + rows[:, None] * stride_qt + j * stride_qh + offs_d[None, :],
                mask=rmask[:, None],
                other=0.0,
            )
            wj = tl.load(W + rows * stride_wt + j, mask=rmask, other=0.0).to(tl.float32)
            x = tl.dot(qj, kt) * scale
            acc += wj[:, None] * tl.maximum(x, 0.0)
        dst = OUT + r_loc[:, None].to(tl.int64) * stride_o + c_loc[None, :]
        tl.store(dst, acc, mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _order_key(x):
    """fp32 -> int64 in [0, 2^32) with the same order (+0 and -0 map together, as they compare equal)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    return tl.where(bits < 0, (~bits).to(tl.int64), bits.to(tl.int64) + 2147483648)


@triton.jit
def _from_order_key(key):
    """Inverse of `_order_key` (for +-0 it returns +0)."""
    bits = tl.where(key >= 2147483648, key - 2147483648, ~key).to(tl.int32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _row_keys(base, ibase, offs, hi, col0, HAS_IDX: tl.constexpr):
    """(order keys, in-range mask, global indices) of one block of a row."""
    m = offs < hi
    if HAS_IDX:
        gidx = tl.load(ibase + offs, mask=m, other=-1).to(tl.int64)
        m = m & (gidx >= 0)
    else:
        gidx = (offs + col0).to(tl.int64)
    key = _order_key(tl.load(base + offs, mask=m, other=float("-inf")))
    return key, m, gidx


@triton.jit
def _radix_threshold(base, ibase, lo, hi, col0, need, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr):
    """Exact k-th largest key by a 4 x 8-bit radix select: (threshold key, how many keys equal to it to take)."""
    bins = tl.arange(0, 512)
    prefix = tl.zeros([], tl.int64)
    remaining = need
    for rnd in tl.static_range(4):
        shift = 24 - 8 * rnd
        hist = tl.zeros([512], tl.int32)
        for c in range(lo, hi, BLOCK):
            key, m, r_idx = _row_keys(base, ibase, c + tl.arange(0, BLOCK), hi, col0, HAS_IDX)
            match = m & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = tl.where(match, (key >> shift) & 255, 256).to(tl.int32)
            hist += tl.histogram(digit, 512)
        h = tl.where(bins < 256, hist, 0)
        from_top = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # count in bins >= b
        b_sel = tl.max(tl.where((from_top >= remaining) & (bins < 256), bins, -1), 0)
        above = tl.sum(tl.where(bins > b_sel, h, 0), 0)
        remaining -= above
        prefix = prefix | (b_sel.to(tl.int64) << shift)
    return prefix, remaining


@triton.jit
def _radix_topk_row(
    base, ibase, lo, hi, col0, need,
    scr_row, OUT_IDX, OUT_SCORE, out_row,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr,
    CAP: tl.constexpr = 0, SAMPLE: tl.constexpr = 1024, FORCE_RADIX: tl.constexpr = False,
):  # fmt: skip
    """Exact top-`need` of base[lo:hi] (need <= TOPK); writes TOPK slots of OUT_IDX/OUT_SCORE at out_row.

    Element i has index i + col0, or ibase[i] when HAS_IDX (candidate lists; index -1 = empty slot; equal scores
    must then appear in ascending index order, which concatenated sorted segment lists satisfy).
    Fast path: a strided sample of the row proposes 8 thresholds, one counting pass picks the highest whose count
    lies in [need, CAP], one pass compacts the keys above it, and one sort of CAP slots orders them. A row of at
    most CAP keys is taken whole; if no proposed threshold fits, the exact radix select decides (slow, rare).
    """
    cap: tl.constexpr = 2 * KP if CAP == 0 else CAP
    n = hi - lo
    thr = tl.zeros([], tl.int64)  # key 0 is below every finite score: take all
    eq_lim = tl.full([], 2147483647, tl.int32)
    if FORCE_RADIX:
        thr, eq_lim = _radix_threshold(base, ibase, lo, hi, col0, need, BLOCK, HAS_IDX)
    elif n > cap:
        sidx = tl.arange(0, SAMPLE)
        sp = lo + (sidx.to(tl.int64) * n) // SAMPLE
        sk, sm, s_idx = _row_keys(base, ibase, sp, hi, col0, HAS_IDX)
        sk = tl.sort(tl.where(sm, sk, 0), descending=True)
        expect = need.to(tl.float32) * SAMPLE / n.to(tl.float32)
        fac = 1.1 + 0.12 * tl.arange(0, 8).to(tl.float32)
        rank = tl.minimum((expect * fac).to(tl.int32) + 1, SAMPLE - 1)
        tau = tl.sum(tl.where(sidx[None, :] == rank[:, None], sk[None, :], 0), 1)
        cnt8 = tl.zeros([8], tl.int32)
        for c in range(lo, hi, BLOCK):
            key, m, c_idx = _row_keys(base, ibase, c + tl.arange(0, BLOCK), hi, col0, HAS_IDX)
            cnt8 += tl.sum((m[:, None] & (key[:, None] >= tau[None, :])).to(tl.int32), 0)
        fits = (cnt8 >= need) & (cnt8 <= cap) & (tau > 0)
        best = tl.max(tl.where(fits, tau, -1), 0)
        if best >= 0:
            thr = best
        else:
            thr, eq_lim = _radix_threshold(base, ibase, lo, hi, col0, need, BLOCK, HAS_IDX)
    # emit: keys above the threshold, and keys equal to it up to eq_lim in index order
    cnt = tl.zeros([], tl.int32)
    eq_seen = tl.zeros([], tl.int32)
    for c in range(lo, hi, BLOCK):
        key, m, gidx = _row_keys(base, ibase, c + tl.arange(0, BLOCK), hi, col0, HAS_IDX)
        eq = m & (key == thr)
        eq_i = eq.to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq_i, 0) - 1
        take = (m & (key > thr)) | (eq & (eq_rank < eq_lim))
        take_i = take.to(tl.int32)
        pos = cnt + tl.cumsum(take_i, 0) - 1
        comp = (key << 31) | (2147483647 - gidx)
        tl.store(scr_row + pos, comp, mask=take & (pos < cap))
        cnt += tl.sum(take_i, 0)
        eq_seen += tl.sum(eq_i, 0)
    tl.debug_barrier()
    slots = tl.arange(0, cap)
    comp = tl.load(scr_row + slots, mask=slots < cnt, other=-1)
    comp = tl.sort(comp, descending=True)
    valid = slots < tl.minimum(cnt, need)
    gidx = tl.where(valid, 2147483647 - (comp & 2147483647), -1)
    score = tl.where(valid, _from_order_key(comp >> 31), float("-inf"))
    omask = slots < TOPK
    tl.store(OUT_IDX + out_row * TOPK + slots, gidx.to(tl.int32), mask=omask)
    tl.store(OUT_SCORE + out_row * TOPK + slots, score, mask=omask)


@triton.jit
def _topk_select_kernel(
    SCORES, ROW_START, SCR, OUT_IDX, OUT_SCORE,
    row0, col0, stride_s,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    CAP: tl.constexpr, SAMPLE: tl.constexpr, FORCE_RADIX: tl.constexpr,
):  # fmt: skip
    """One program per query row t: its window is global keys [start(t), t] = slab columns [start-col0, t-col0]."""
    r = tl.program_id(0)
    t = row0 + r
    a = tl.load(ROW_START + t)
    base = SCORES + r.to(tl.int64) * stride_s - col0
    need = tl.minimum(t - a + 1, TOPK)
    scr_row = SCR + r.to(tl.int64) * CAP
    _radix_topk_row(
        base, base, a, t + 1, 0, need, scr_row, OUT_IDX, OUT_SCORE, t.to(tl.int64),
        TOPK, KP, BLOCK, False, CAP, SAMPLE, FORCE_RADIX,
    )  # fmt: skip


def row_starts(cu_seqlens: Tensor, n_rows: int) -> Tensor:
    """int32 [T]: the first row of each row's sample (rows outside cu_seqlens start at themselves)."""
    cu = cu_seqlens.to(torch.int64)
    rows = torch.arange(n_rows, device=cu.device)
    sample = torch.searchsorted(cu[1:], rows, right=True).clamp(max=max(0, cu.numel() - 2))
    start = cu[sample]
    start = torch.where((rows >= cu[0]) & (rows < cu[-1]), start, rows)
    return start.to(torch.int32).contiguous()


def indexer_topk(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    cu_seqlens: Tensor,
    topk: int,
    block: int = 1024,
    slab_bytes: int = 1 << 31,
    select_block: int = 1024,
    cap: int = 0,
    sample: int = 2048,
    force_radix: bool = False,
    tile: tuple[int, int, int] = (64, 128, 8),
    select: bool = True,
) -> tuple[Tensor, Tensor]:
    """Same contract as `indexer_topk_reference`; `block` is unused (kept for signature parity): the kernel chunks
    queries so one fp32 score slab stays under `slab_bytes`. cap (default 2 * next_pow2(topk)) / sample / force_radix
    tune the selection (see `_radix_topk_row`); every setting gives the same result. tile = (rows, keys, warps) of
    the score kernel; select=False computes the score slabs only (to time the two stages apart)."""
    del block
    t_total, h_i, d_i = q_idx.shape
    if d_i & (d_i - 1) or d_i < 16:
        raise ValueError(f"indexer dim {d_i} must be a power of two >= 16")
    dev = q_idx.device
    q_idx, k_idx, w = q_idx.contiguous(), k_idx.contiguous(), w.contiguous()
    indices = torch.full((t_total, topk), -1, dtype=torch.int32, device=dev)
    scores = torch.full((t_total, topk), float("-inf"), dtype=torch.float32, device=dev)
    if t_total == 0 or topk == 0:
        return indices, scores
    starts = row_starts(cu_seqlens, t_total)
    starts_host = starts.tolist()
    kp = triton.next_power_of_2(topk)
    cap = cap or 2 * kp
    bm, bn, warps = tile
    row0, row_end = int(cu_seqlens[0]), int(cu_seqlens[-1])
    scratch = torch.empty((0, cap), device=dev, dtype=torch.int64)
    while row0 < row_end:
        # grow the chunk while its slab (rows x window) fits the budget
        row1 = row0 + 1
        col0 = starts_host[row0]
        while row1 < row_end:
            nxt = min(row_end, row1 + bm)
            c0 = min(col0, min(starts_host[row1:nxt]))
            if (nxt - row0) * (nxt - c0) * 4 > slab_bytes:
                break
            row1, col0 = nxt, c0
        n_rows, n_cols = row1 - row0, row1 - col0
        slab = torch.empty((n_rows, n_cols), device=dev, dtype=torch.float32)
        grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))
        _indexer_scores_kernel[grid](
            q_idx, k_idx, w, starts, slab,
            row0, n_rows, col0, n_cols, t_total, d_i**-0.5,
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w.stride(0), slab.stride(0),
            H=h_i, DI=d_i, BM=bm, BN=bn, num_warps=warps,
        )  # fmt: skip
        if not select:
            row0 = row1
            continue
        if scratch.shape[0] < n_rows:
            scratch = torch.empty((n_rows, cap), device=dev, dtype=torch.int64)
        _topk_select_kernel[(n_rows,)](
            slab, starts, scratch, indices, scores, row0, col0, slab.stride(0),
            TOPK=topk, KP=kp, BLOCK=select_block, CAP=cap, SAMPLE=sample, FORCE_RADIX=force_radix, num_warps=8,
        )  # fmt: skip
        row0 = row1
    return indices, scores


__all__ = ["indexer_topk", "row_starts"]
