"""Lightning-indexer scores with all heads' queries resident: one tensor-core dot per key tile for BM queries x H_I
heads at once, the head sum a reduction over row groups (the layout of DeepSeek's DeepGEMM `fp8_mqa_logits`, written
here in Triton).

Why: the library's fused score + compact kernel (keye/kernels/indexer_topk.py, `_index_scores_tile`) loops over the
H_I heads per key tile, reloading each head's [BM, D_I] queries and running H_I small dots; at 128K that loop, not the
MMA, is its cost (bench/RESULTS.md, `## dsa`, helper j20). Here a program owns BM query rows and keeps their
Q2 = [BM * H_I, D_I] (row m * H_I + h) in registers / shared memory for its whole key loop; per key tile:

  KMAJOR=False: S = Q2 @ K^T -> [BM*H_I, BN]; relu; times w[m, h] per row; reshape [BM, H_I, BN], sum over H_I.
  KMAJOR=True : S = K @ Q2^T -> [BN, BM*H_I] (keys on the MMA's M, as DeepGEMM): the head sum reduces the fast
                axis (in-thread + the 4 lanes of a quad) instead of 8 lanes x 2 rows; the tile is [BN, BM].
  HSUM_MMA    : (KMAJOR only) the head sum as a second dot, relu(S) [BN, BM*H_I] @ Wblk [BM*H_I, BM] with
                Wblk[m*H_I + h, m] = w[m, h]; operands rounded to HS_DTYPE (bf16 on GPU): ~2^-9 relative error per
                term, so near-tied keys at the k-th place can swap (not the exact-set contract; measured in
                bench/dsa_indexer_resident.py).

The per-key FP8 scale multiplies each score column after the head sum (it commutes with the relu: see
indexer_fp8.py). MODE 0 writes the masked scores to a [rows, keys] slab (tests, small T), 1 keeps a row max (timing:
scores only), 2 compacts the keys at or above each row's threshold in index order, exactly as
`_scores_compact_kernel` does (same candidate lists up to fp32 summation order), for the library's select kernel.
Heads are padded to a power of two (zero queries and weights).

Measured (H200, 128K, bench/RESULTS.md `## dsa`, helper k20): keys on M with PERM (the head sum in-thread) is the
only fast variant: scores only 24.2 ms FP8 / 34.5 bf16 vs 29.0 / 39.9 for the library's head loop; queries on M or
unpermuted columns pay lane shuffles (42-71 ms); HSUM_MMA is 34 ms and inexact. As the fused top-k's score + compact
kernel it is slower than the library's (FP8 score + compact 72.6-74.9 vs 60.3 ms): a row's keys span the 4 warps of
the wgmma's M, so the compaction's prefix sum crosses warps every tile. Hence opt-in (`indexer_topk(...,
resident_tile=...)`), not the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tile_tail(
    acc, cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best, OUT, stride_o, p_s, p_i,
    KS, HAS_KS: tl.constexpr, MODE: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """Per [BM, BN] tile of head-summed scores: the key scales, the causal window, then MODE 0 (store the slab),
    1 (row max) or 2 (compact the keys >= tau in index order, as `_scores_compact_kernel`)."""
    if HAS_KS:
        acc = acc * tl.load(KS + cols, mask=cmask, other=0.0)[None, :]
    inwin = rmask[:, None] & (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])
    if MODE == 0:
        dst = OUT + r_loc[:, None].to(tl.int64) * stride_o + cols[None, :]
        tl.store(dst, tl.where(inwin, acc, float("-inf")), mask=rmask[:, None] & cmask[None, :])
    elif MODE == 1:
        best = tl.maximum(best, tl.max(tl.where(inwin, acc, float("-inf")), 1))
    else:
        take = inwin & (acc >= tau[:, None])
        take_i = take.to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(take_i, 1) - 1
        keep = take & (pos < CAP)
        tl.store(p_s[:, None] + pos, acc, mask=keep)
        tl.store(p_i[:, None] + pos, cols[None, :] + tl.zeros(acc.shape, tl.int32), mask=keep)
        cnt += tl.sum(take_i, 1)
    return cnt, best


@triton.jit
def _tile_tail_t(
    acc, cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best, OUT, stride_o, p_s, p_i,
    KS, HAS_KS: tl.constexpr, MODE: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    """`_tile_tail` for a [BN, BM] tile (keys on the first axis: the compaction scans axis 0)."""
    if HAS_KS:
        acc = acc * tl.load(KS + cols, mask=cmask, other=0.0)[:, None]
    inwin = rmask[None, :] & (cols[:, None] >= starts[None, :]) & (cols[:, None] <= rows[None, :])
    if MODE == 0:
        dst = OUT + r_loc[None, :].to(tl.int64) * stride_o + cols[:, None]
        tl.store(dst, tl.where(inwin, acc, float("-inf")), mask=rmask[None, :] & cmask[:, None])
    elif MODE == 1:
        best = tl.maximum(best, tl.where(inwin, acc, float("-inf")))  # [BN, BM]: keys span warps, reduce once
    else:
        take = inwin & (acc >= tau[None, :])
        take_i = take.to(tl.int32)
        pos = cnt[None, :] + tl.cumsum(take_i, 0) - 1
        keep = take & (pos < CAP)
        tl.store(p_s[None, :] + pos, acc, mask=keep)
        tl.store(p_i[None, :] + pos, cols[:, None] + tl.zeros(acc.shape, tl.int32), mask=keep)
        cnt += tl.sum(take_i, 0)
    return cnt, best


@triton.jit
def _head_sum_k(s, w2, wblk, BN: tl.constexpr, BM: tl.constexpr, HP: tl.constexpr,
                HSUM_MMA: tl.constexpr, PERM: tl.constexpr, HS_DTYPE: tl.constexpr):  # fmt: skip
    """[BN, BM*HP] scores of one key tile (keys on M) -> [BN, BM] head sums."""
    if HSUM_MMA:
        acc = tl.dot(tl.maximum(s, 0.0).to(HS_DTYPE), wblk)
    elif PERM:  # columns ordered (m_hi, h_hi, m_lo, h0): the head bits are the accumulator's register bits
        p = tl.reshape(tl.maximum(s, 0.0) * w2[None, :], [BN, BM // 4, HP // 2, 4, 2])
        acc = tl.reshape(tl.sum(tl.sum(p, axis=4), axis=2), [BN, BM])
    else:
        acc = tl.sum(tl.reshape(tl.maximum(s, 0.0) * w2[None, :], [BN, BM, HP]), axis=2)
    return acc


@triton.jit
def _resident_kernel(
    QI, KI, W, ROW_START, TAU, SCR_S, SCR_I, CNT, KS, OUT,
    row0, n_rows, n_keys,
    stride_qt, stride_qh, stride_kt, stride_wt, stride_o,
    H: tl.constexpr, HP: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr,
    HAS_KS: tl.constexpr, MODE: tl.constexpr, KMAJOR: tl.constexpr, HSUM_MMA: tl.constexpr = False,
    PERM: tl.constexpr = False, TRANS: tl.constexpr = False, SWP: tl.constexpr = False, WS: tl.constexpr = False,
    HS_DTYPE: tl.constexpr = tl.bfloat16, q_row0=0, out_col0=0,
):  # fmt: skip
    """BM query rows [row0 + pid*BM, ...) against their whole causal windows, one key tile of BN at a time.
    W holds the head weights with the 1/sqrt(D_I) scale folded in (a positive scale commutes with the relu).
    KMAJOR options: PERM orders the resident columns so that a query's heads sit in one thread's registers (the
    head sum needs no shuffles; the wgmma accumulator holds column bits 0 and >= 3 in registers, bits 1-2 in the
    lanes of a quad); TRANS compacts on the transposed [BM, BN] tile; SWP issues the next tile's dot before the
    current tile's epilogue; WS asks Triton to warp-specialise the key loop (`tl.range(warp_specialize=...)`).
    MODE 1 keys on M keeps a running [BN, BM] max and reduces it once (keys span the warps)."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # longest windows first
    OUT = OUT - out_col0  # MODE 0: OUT's column 0 is key out_col0 (a slab of a row chunk's windows)
    r_loc = pid * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid * BM + BM, n_rows) - 1
    offs_d = tl.arange(0, DI)
    # the resident queries: column i holds (query m, head h); m-major (i = m * HP + h) unless PERM
    i2 = tl.arange(0, BM * HP)
    if PERM:
        h2 = (i2 & 1) + 2 * ((i2 // 8) % (HP // 2))
        m2 = ((i2 // 2) & 3) + 4 * (i2 // (4 * HP))
    else:
        m2 = i2 // HP
        h2 = i2 % HP
    ok2 = ((pid * BM + m2) < n_rows) & (h2 < H)
    rows2 = (row0 - q_row0 + pid * BM + m2).to(tl.int64)  # QI / W hold rows from q_row0 on
    w2 = tl.load(W + rows2 * stride_wt + h2, mask=ok2, other=0.0).to(tl.float32)
    wblk = w2
    if KMAJOR:
        q2 = tl.load(
            QI + rows2[None, :] * stride_qt + h2[None, :] * stride_qh + offs_d[:, None],
            mask=ok2[None, :],
            other=0.0,
        )  # [DI, BM*HP]
        if HSUM_MMA:
            wblk = tl.where(m2[:, None] == tl.arange(0, BM)[None, :], w2[:, None], 0.0).to(HS_DTYPE)
    else:
        q2 = tl.load(
            QI + rows2[:, None] * stride_qt + h2[:, None] * stride_qh + offs_d[None, :],
            mask=ok2[:, None],
            other=0.0,
        )  # [BM*HP, DI]
    tau = tl.full([BM], float("inf"), tl.float32)
    p_s = SCR_S + r_loc.to(tl.int64) * CAP
    p_i = SCR_I + r_loc.to(tl.int64) * CAP
    if MODE == 2:
        tau = tl.load(TAU + rows, mask=rmask, other=float("inf"))
    cnt = tl.zeros([BM], tl.int32)
    if KMAJOR and not TRANS:
        best = tl.full([BN, BM], float("-inf"), tl.float32)
    else:
        best = tl.full([BM], float("-inf"), tl.float32)
    if KMAJOR and SWP:  # the dot of tile i + 1 is issued before tile i's epilogue
        cols = lo + tl.arange(0, BN)
        kt = tl.load(KI + cols[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=(cols < n_keys)[:, None],
                     other=0.0)  # fmt: skip
        s = tl.dot(kt, q2)
        for c0 in range(lo, hi + 1, BN):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < n_keys
            nxt = cols + BN
            kn = tl.load(KI + nxt[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                         mask=((nxt < n_keys) & (nxt <= hi))[:, None], other=0.0)  # fmt: skip
            s_next = tl.dot(kn, q2)
            acc = _head_sum_k(s, w2, wblk, BN, BM, HP, HSUM_MMA, PERM, HS_DTYPE)
            if TRANS:
                cnt, best = _tile_tail(tl.trans(acc), cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best,
                                       OUT, stride_o, p_s, p_i, KS, HAS_KS, MODE, CAP)  # fmt: skip
            else:
                cnt, best = _tile_tail_t(acc, cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best,
                                         OUT, stride_o, p_s, p_i, KS, HAS_KS, MODE, CAP)  # fmt: skip
            s = s_next
    else:
        for c0 in tl.range(lo, hi + 1, BN, warp_specialize=WS):
            cols = c0 + tl.arange(0, BN)
            cmask = cols < n_keys
            if KMAJOR:
                kt = tl.load(
                    KI + cols[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                    mask=cmask[:, None],
                    other=0.0,
                )  # [BN, DI]
                acc = _head_sum_k(tl.dot(kt, q2), w2, wblk, BN, BM, HP, HSUM_MMA, PERM, HS_DTYPE)  # [BN, BM]
                if TRANS:
                    cnt, best = _tile_tail(tl.trans(acc), cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best,
                                           OUT, stride_o, p_s, p_i, KS, HAS_KS, MODE, CAP)  # fmt: skip
                else:
                    cnt, best = _tile_tail_t(acc, cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best,
                                             OUT, stride_o, p_s, p_i, KS, HAS_KS, MODE, CAP)  # fmt: skip
            else:
                kt = tl.load(
                    KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
                    mask=cmask[None, :],
                    other=0.0,
                )  # [DI, BN]
                p = tl.maximum(tl.dot(q2, kt), 0.0) * w2[:, None]  # [BM*HP, BN]
                acc = tl.sum(tl.reshape(p, [BM, HP, BN]), axis=1)  # [BM, BN]
                cnt, best = _tile_tail(acc, cols, cmask, rows, r_loc, rmask, starts, tau, cnt, best,
                                       OUT, stride_o, p_s, p_i, KS, HAS_KS, MODE, CAP)  # fmt: skip
    if MODE == 2:
        tl.store(CNT + r_loc, cnt, mask=rmask)
    elif MODE == 1:
        if KMAJOR and not TRANS:
            best = tl.max(best, 0)
        tl.store(CNT + r_loc, best.to(tl.int32, bitcast=True), mask=rmask)


def launch_resident(
    q_idx: Tensor, k_idx: Tensor, w_folded: Tensor, starts: Tensor, row0: int, n_rows: int, mode: int,
    tile: tuple, tau: Tensor | None = None, scr_s: Tensor | None = None, scr_i: Tensor | None = None,
    cnt: Tensor | None = None, k_scale: Tensor | None = None, out: Tensor | None = None, cap: int = 16,
    q_row0: int = 0, out_col0: int = 0,
):  # fmt: skip
    """One launch over the global rows [row0, row0 + n_rows) (starts / tau indexed by global row; scr_* / cnt /
    out by row - row0, out's column 0 being key out_col0; q_idx / w_folded hold rows from q_row0 on).
    tile = (BM, BN, warps, stages, kmajor[, hsum_mma, perm, trans, swp]) (kernel options of the same names).
    w_folded: float32 head weights times 1/sqrt(D_I). Unused buffers may be None. Returns Triton's launch handle
    (the compiled kernel, for benches that read its IR)."""
    bm, bn, warps, stages, kmajor, *rest = tile
    hsum_mma, perm, trans, swp, ws = (list(map(bool, rest)) + [False] * 5)[:5]
    _, h_i, d_i = q_idx.shape
    dummy = w_folded
    interp = not q_idx.is_cuda
    return _resident_kernel[(triton.cdiv(n_rows, bm),)](
        q_idx, k_idx, w_folded, starts, dummy if tau is None else tau,
        dummy if scr_s is None else scr_s, starts if scr_i is None else scr_i,
        starts if cnt is None else cnt, dummy if k_scale is None else k_scale, dummy if out is None else out,
        row0, n_rows, k_idx.shape[0],
        q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w_folded.stride(0), 0 if out is None else out.stride(0),
        H=h_i, HP=triton.next_power_of_2(h_i), DI=d_i, BM=bm, BN=bn, CAP=cap, HAS_KS=k_scale is not None,
        MODE=mode, KMAJOR=bool(kmajor), HSUM_MMA=hsum_mma, PERM=perm, TRANS=trans, SWP=swp, WS=ws, HS_DTYPE=tl.float32 if interp else tl.bfloat16,
        q_row0=q_row0, out_col0=out_col0, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def resident_scores(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, cu_seqlens: Tensor, k_scale: Tensor | None = None,
    tile: tuple = (8, 64, 4, 3, True),
) -> Tensor:  # fmt: skip
    """float32 [T, T] index scores I[t, s] (-inf outside t's causal window in its sample): the kernel's MODE 0, for
    tests and small T (same function as `dsa_reference.indexer_scores_block`, per-key scales applied)."""
    from keye.kernels.indexer_topk import row_starts

    t_total, _, d_i = q_idx.shape
    starts = row_starts(cu_seqlens, t_total)
    out = torch.full((t_total, t_total), float("-inf"), device=q_idx.device, dtype=torch.float32)
    w_folded = (w.float() * d_i**-0.5).contiguous()
    ks = None if k_scale is None else k_scale.float().contiguous()
    row0, row1 = int(cu_seqlens[0]), int(cu_seqlens[-1])
    launch_resident(
        q_idx.contiguous(), k_idx.contiguous(), w_folded, starts, row0, row1 - row0, 0, tile, k_scale=ks,
        out=out[row0:],
    )  # fmt: skip
    return out


__all__ = ["launch_resident", "resident_scores"]
