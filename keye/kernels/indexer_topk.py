"""Triton lightning-indexer scores with exact top-k selection (DSA), for packed causal batches.

Follows DeepSeek-V3.2-Exp's lightning indexer (I[t,s] = sum_j w[t,j] relu(q_j . k_s / sqrt(D_I))) and the
radix-select idea of TileLang's DSA `topk_selector` example, written here in Triton. Spec:
`dsa_reference.indexer_topk_reference` (the exact top-k set, ties to the smaller index, listed in ascending index
order, -1/-inf padding).

Two kernels per chunk of query rows: (1) tensor-core scores of the chunk against its key window (a bounded
[chunk, window] fp32 slab, never L x L); (2) one program per row: a strided sample proposes a threshold, one pass
compacts the keys at or above it, and a bit-by-bit search over those candidates in registers finds the exact k-th
score (a 4 x 8-bit radix select over the row when the proposal misses). No sort anywhere: the earlier version sorted
a sample and the candidates per row, and those sorts were ~80% of its ~240 ms selection at 128K (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _index_scores_tile(
    QI, W, rows, rmask, kt, scale, stride_qt, stride_qh, stride_wt,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FOLDED: tl.constexpr = False,
):  # fmt: skip
    """I[rows, keys of kt] = sum_j w[row, j] relu(q[row, j] . k * scale): one tensor-core dot per indexer head.
    FOLDED: W already holds w * scale (a positive scale commutes with the relu): one multiply less per pair and
    head (exact when scale is a power of two, as for D_I = 16, 64, 256)."""
    offs_d = tl.arange(0, DI)
    acc = tl.zeros([BM, BN], tl.float32)
    for j in range(H):
        qj = tl.load(
            QI + rows[:, None] * stride_qt + j * stride_qh + offs_d[None, :], mask=rmask[:, None], other=0.0
        )
        wj = tl.load(W + rows * stride_wt + j, mask=rmask, other=0.0).to(tl.float32)
        if FOLDED:
            acc += wj[:, None] * tl.maximum(tl.dot(qj, kt), 0.0)
        else:
            acc += wj[:, None] * tl.maximum(tl.dot(qj, kt) * scale, 0.0)
    return acc


@triton.jit
def _indexer_scores_kernel(
    QI, KI, W, ROW_START, OUT, KS,
    row0, n_rows, col0, n_cols, n_keys, scale, cstride,
    stride_qt, stride_qh, stride_kt, stride_wt, stride_o,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_KS: tl.constexpr = False,
    q_shift=0, w_shift=0,
):  # fmt: skip
    """OUT[r, c] = I[row0 + r, col0 + c * cstride] for the tiles that touch some row's causal window (others
    untouched); cstride > 1 scores a strided sample of the keys (threshold proposals of the fused path).
    q_shift / w_shift: QI / W hold rows from q_row0 on (context parallelism), q_row0 * their row stride."""
    QI -= q_shift
    W -= w_shift
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r_loc = pid_m * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    c_loc = pid_n * BN + tl.arange(0, BN)
    cols = col0 + c_loc * cstride
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid_m * BM + BM, n_rows) - 1  # last row of the block (keys <= it)
    if (col0 + pid_n * BN * cstride <= hi) and (col0 + (pid_n * BN + BN - 1) * cstride >= lo):
        offs_d = tl.arange(0, DI)
        kmask = (cols < n_keys) & (c_loc < n_cols)
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0
        )
        acc = _index_scores_tile(
            QI, W, rows, rmask, kt, scale, stride_qt, stride_qh, stride_wt, H, DI, BM, BN
        )
        if HAS_KS:  # FP8 keys: per-key scale (> 0, so it commutes with the relu)
            acc = acc * tl.load(KS + cols, mask=kmask, other=0.0)[None, :]
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
def _kth_key(keys, valid, need, BITS: tl.constexpr = 32):
    """The need-th largest of keys[valid] (keys in [0, 2^32)): the largest v with count(keys >= v) >= need, found
    bit by bit (32 counting rounds over registers instead of a sort). need <= 0 gives 2^32 - 1. BITS < 32 searches
    only the top bits (the rest zero): a key at most the need-th, in BITS rounds (enough for a threshold)."""
    v = tl.zeros([], tl.int64)
    one = tl.full([], 1, tl.int64)
    for b in tl.static_range(BITS):
        trial = v | (one << (31 - b))
        c = tl.sum((valid & (keys >= trial)).to(tl.int32), 0)
        v = tl.where(c >= need, trial, v)
    return v


@triton.jit
def _kth_key_prefix(keys, valid, need):
    """`_kth_key` searching only the bits below the common prefix of the valid keys' min and max (fewer rounds
    when the keys are close, as candidates above a threshold are). Needs 1 <= need <= count(valid)."""
    lo = tl.min(tl.where(valid, keys, 4294967295), 0)
    hi = tl.max(tl.where(valid, keys, 0), 0)
    diff = tl.maximum(lo ^ hi, 1)
    nb = tl.minimum((tl.log2(diff.to(tl.float32)) + 1.0).to(tl.int32), 32)  # >= bit length of diff
    one = tl.full([], 1, tl.int64)
    kth = lo & ~((one << nb) - 1)
    for b in range(nb):
        trial = kth | (one << (nb - 1 - b))
        c = tl.sum((valid & (keys >= trial)).to(tl.int32), 0)
        kth = tl.where(c >= need, trial, kth)
    return kth


@triton.jit
def _compact_row(
    base, ibase, lo, hi, col0, thr, eq_lim, scr_row, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr, CAP: tl.constexpr
):  # fmt: skip
    """Write (key, index) of the keys above thr, and of the first eq_lim keys equal to it, to scr_row in row order
    (at most CAP); return how many qualified (more than CAP: the caller picks another threshold)."""
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
        tl.store(scr_row + pos, comp, mask=take & (pos < CAP))
        cnt += tl.sum(take_i, 0)
        eq_seen += tl.sum(eq_i, 0)
    return cnt


@triton.jit
def _radix_topk_row(
    base, ibase, lo, hi, col0, need,
    scr_row, OUT_IDX, OUT_SCORE, out_row,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, HAS_IDX: tl.constexpr,
    CAP: tl.constexpr = 0, SAMPLE: tl.constexpr = 1024, FORCE_RADIX: tl.constexpr = False,
):  # fmt: skip
    """Exact top-`need` of base[lo:hi] (need <= TOPK), written in ascending index order into the TOPK slots of
    OUT_IDX/OUT_SCORE at out_row (-1 / -inf after the first `need`).

    Element i has index i + col0, or ibase[i] when HAS_IDX (candidate lists, index -1 = empty slot, in ascending
    index order -- as concatenated per-segment outputs are). scr_row holds CAP int64 (default 4 * KP).
    1. A strided sample of the row proposes a threshold expected to leave about CAP/2 keys at or above it (a row
       of at most CAP keys takes them all). 2. One pass compacts those keys into scr_row, in row order. 3. If the
       count falls outside [need, CAP] (rare: heavy ties), the exact 4 x 8-bit radix select decides and the row is
       compacted again. 4. A 32-round bit search over the candidates in registers finds the exact need-th key (no
       sort); the candidates above it, and the first ones equal to it, are emitted in index order.
    """
    cap: tl.constexpr = 4 * KP if CAP == 0 else CAP
    n = hi - lo
    big = tl.full([], 2147483647, tl.int32)
    if FORCE_RADIX:
        thr, eq_lim = _radix_threshold(base, ibase, lo, hi, col0, need, BLOCK, HAS_IDX)
        cnt = _compact_row(base, ibase, lo, hi, col0, thr, eq_lim, scr_row, BLOCK, HAS_IDX, cap)
    elif n > cap:
        sidx = tl.arange(0, SAMPLE)
        sp = lo + (sidx.to(tl.int64) * n) // SAMPLE
        sk, sm, s_idx = _row_keys(base, ibase, sp, hi, col0, HAS_IDX)
        expect = need.to(tl.float32) * SAMPLE / n.to(tl.float32)  # sample keys above the true threshold
        target = 0.5 * cap / tl.maximum(need, 1).to(tl.float32)  # aim at cap/2 candidates
        rank = tl.minimum((expect * target).to(tl.int32) + 1, SAMPLE)
        tau = _kth_key(sk, sm, rank)
        cnt = _compact_row(base, ibase, lo, hi, col0, tau, big, scr_row, BLOCK, HAS_IDX, cap)
        if (cnt < need) or (cnt > cap):
            thr, eq_lim = _radix_threshold(base, ibase, lo, hi, col0, need, BLOCK, HAS_IDX)
            cnt = _compact_row(base, ibase, lo, hi, col0, thr, eq_lim, scr_row, BLOCK, HAS_IDX, cap)
    else:  # key 0 is below every finite score: take all
        cnt = _compact_row(
            base, ibase, lo, hi, col0, tl.zeros([], tl.int64), big, scr_row, BLOCK, HAS_IDX, cap
        )
    tl.debug_barrier()
    _emit_topk(scr_row, cnt, need, OUT_IDX, OUT_SCORE, out_row, TOPK, KP, cap)


@triton.jit
def _emit_topk(
    scr_row, cnt, need, OUT_IDX, OUT_SCORE, out_row, TOPK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr
):
    """`_emit_selected` over cnt (need <= cnt <= CAP) candidates at scr_row (key << 31 | 2^31-1-index)."""
    slots = tl.arange(0, CAP)
    valid = slots < tl.minimum(cnt, CAP)
    comp = tl.load(scr_row + slots, mask=valid, other=-1)
    gidx = 2147483647 - (comp & 2147483647)
    _emit_selected(comp >> 31, gidx, valid, need, OUT_IDX, OUT_SCORE, out_row, TOPK, KP)


@triton.jit
def _emit_selected(
    keys, gidx, valid, need, OUT_IDX, OUT_SCORE, out_row, TOPK: tl.constexpr, KP: tl.constexpr
):
    """Candidates (order keys, indices) in index order: the exact need-th key by a bit search in registers, then
    the keys above it and the first ones equal to it, in index order, into the TOPK slots at out_row (-1 / -inf
    after `need`). The search covers only the bits below the candidates' common prefix (min/max keys)."""
    kth = _kth_key_prefix(keys, valid, need)
    above = valid & (keys > kth)
    eq = valid & (keys == kth)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - 1
    take = above | (eq & (eq_rank < need - tl.sum(above.to(tl.int32), 0)))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    dst = out_row * TOPK + pos
    tl.store(OUT_IDX + dst, gidx.to(tl.int32), mask=take)
    tl.store(OUT_SCORE + dst, _from_order_key(keys), mask=take)
    tail = tl.arange(0, KP)
    tmask = (tail >= need) & (tail < TOPK)
    tl.store(OUT_IDX + out_row * TOPK + tail, tl.full([KP], -1, tl.int32), mask=tmask)
    tl.store(OUT_SCORE + out_row * TOPK + tail, tl.full([KP], float("-inf"), tl.float32), mask=tmask)


@triton.jit
def _topk_select_kernel(
    SCORES, ROW_START, SCR, OUT_IDX, OUT_SCORE,
    row0, col0, stride_s,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    CAP: tl.constexpr, SAMPLE: tl.constexpr, FORCE_RADIX: tl.constexpr, q_row0=0,
):  # fmt: skip
    """One program per query row t: its window is global keys [start(t), t] = slab columns [start-col0, t-col0];
    its output row is t - q_row0."""
    r = tl.program_id(0)
    t = row0 + r
    a = tl.load(ROW_START + t)
    base = SCORES + r.to(tl.int64) * stride_s - col0
    need = tl.minimum(t - a + 1, TOPK)
    scr_row = SCR + r.to(tl.int64) * CAP
    _radix_topk_row(
        base, base, a, t + 1, 0, need, scr_row, OUT_IDX, OUT_SCORE, (t - q_row0).to(tl.int64),
        TOPK, KP, BLOCK, False, CAP, SAMPLE, FORCE_RADIX,
    )  # fmt: skip


@triton.jit
def _sample_threshold_kernel(
    SAMP, ROW_START, TAU, row0, col0, cstride, n_cols, stride_s,
    TOPK: tl.constexpr, CAP: tl.constexpr, SMAX: tl.constexpr,
):  # fmt: skip
    """TAU[t]: a score expected to leave about CAP/2 of row t's keys at or above it, read off the strided sample
    of its scores (-inf = take every key: rows of at most CAP keys)."""
    r = tl.program_id(0)
    t = row0 + r
    a = tl.load(ROW_START + t)
    n = t - a + 1
    tau = float("-inf")
    if n > CAP:
        c = tl.arange(0, SMAX)
        g = col0 + c.to(tl.int64) * cstride
        valid = (c < n_cols) & (g >= a) & (g <= t)
        v = tl.load(SAMP + r.to(tl.int64) * stride_s + c, mask=valid, other=float("-inf"))
        n_s = tl.sum(valid.to(tl.int32), 0)
        rank = tl.minimum((0.5 * CAP * n_s.to(tl.float32) / n.to(tl.float32)).to(tl.int32) + 1, n_s)
        tau = _from_order_key(_kth_key_prefix(_order_key(v), valid, rank))
    tl.store(TAU + t, tau)


@triton.jit
def _scores_compact_kernel(
    QI, KI, W, ROW_START, TAU, SCR_S, SCR_I, CNT, KS,
    row0, n_rows, n_keys, scale,
    stride_qt, stride_qh, stride_kt, stride_wt,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr,
    HAS_KS: tl.constexpr = False, FOLDED: tl.constexpr = False, q_shift=0, w_shift=0,
):  # fmt: skip
    """Scores of BM rows against their whole windows, tile by tile (flash-style, never stored); the keys at or
    above each row's threshold are compacted in index order into SCR_S / SCR_I[r, :CAP] (score, index), their
    number into CNT[r]. Plain fp32 compares in the tile loop (no order keys: +0 == -0 holds for floats too).
    Slots are addressed from per-row base pointers with int32 offsets (fewer 64-bit address ops per pair: with the
    folded scale, 81 -> 74 ms bf16 / 63.5 -> 61 ms FP8 at 128K, bench/dsa_indexer_profile.py)."""
    QI -= q_shift  # rows from q_row0 on (see _indexer_scores_kernel)
    W -= w_shift
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # longest windows first
    r_loc = pid * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    tau = tl.load(TAU + rows, mask=rmask, other=float("inf"))
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid * BM + BM, n_rows) - 1
    offs_d = tl.arange(0, DI)
    row_off = r_loc.to(tl.int64) * CAP
    p_s = (SCR_S + row_off)[:, None]
    p_i = (SCR_I + row_off)[:, None]
    cnt = tl.zeros([BM], tl.int32)
    for c0 in range(lo, hi + 1, BN):
        cols = c0 + tl.arange(0, BN)
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=(cols < n_keys)[None, :],
            other=0.0,
        )
        acc = _index_scores_tile(
            QI, W, rows, rmask, kt, scale, stride_qt, stride_qh, stride_wt, H, DI, BM, BN, FOLDED
        )
        if HAS_KS:
            acc = acc * tl.load(KS + cols, mask=cols < n_keys, other=0.0)[None, :]
        inwin = rmask[:, None] & (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])
        take = inwin & (acc >= tau[:, None])
        take_i = take.to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(take_i, 1) - 1
        keep = take & (pos < CAP)
        tl.store(p_s + pos, acc, mask=keep)
        tl.store(p_i + pos, (cols[None, :] + tl.zeros([BM, BN], tl.int32)), mask=keep)
        cnt += tl.sum(take_i, 1)
    tl.store(CNT + r_loc, cnt, mask=rmask)


@triton.jit
def _select_candidates_kernel(
    SCR_S, SCR_I, CNT, ROW_START, OUT_IDX, OUT_SCORE, MISS, row0,
    TOPK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, q_row0=0,
):  # fmt: skip
    """Exact top-k of row t from its candidates; MISS[r] = 1 when the threshold left fewer than need or more than
    CAP candidates (the caller redoes those rows on the slab path)."""
    r = tl.program_id(0)
    t = row0 + r
    a = tl.load(ROW_START + t)
    need = tl.minimum(t - a + 1, TOPK)
    cnt = tl.load(CNT + r)
    if (cnt >= need) and (cnt <= CAP):
        slots = tl.arange(0, CAP)
        valid = slots < cnt
        off = r.to(tl.int64) * CAP + slots
        keys = _order_key(tl.load(SCR_S + off, mask=valid, other=float("-inf")))
        gidx = tl.load(SCR_I + off, mask=valid, other=-1)
        _emit_selected(keys, gidx, valid, need, OUT_IDX, OUT_SCORE, (t - q_row0).to(tl.int64), TOPK, KP)
    else:
        tl.store(MISS + r, 1)


def empty_selection(q_idx: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """The top-k outputs of q_idx's rows before selection: indices -1 (int32) and scores -inf (fp32), [rows,
    topk]; checks the indexer dim the score kernels need (a power of two >= 16)."""
    n_q, _, d_i = q_idx.shape
    if d_i & (d_i - 1) or d_i < 16:
        raise ValueError(f"indexer dim {d_i} must be a power of two >= 16")
    indices = torch.full((n_q, topk), -1, dtype=torch.int32, device=q_idx.device)
    return indices, torch.full((n_q, topk), float("-inf"), dtype=torch.float32, device=q_idx.device)


def row_starts(cu_seqlens: Tensor, n_rows: int) -> Tensor:
    """int32 [T]: the first row of each row's sample (rows outside cu_seqlens start at themselves)."""
    cu = cu_seqlens.to(torch.int64)
    rows = torch.arange(n_rows, device=cu.device)
    sample = torch.searchsorted(cu[1:], rows, right=True).clamp(max=max(0, cu.numel() - 2))
    start = cu[sample]
    start = torch.where((rows >= cu[0]) & (rows < cu[-1]), start, rows)
    return start.to(torch.int32).contiguous()


def _slab_rows(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, starts: Tensor, starts_host: list[int], row0: int, row_end: int,
    indices: Tensor, scores: Tensor, topk: int, cap: int, slab_bytes: int, select_block: int, sample: int,
    force_radix: bool, tile: tuple[int, int, int], select: bool, k_scale: Tensor | None = None, q_row0: int = 0,
) -> None:  # fmt: skip
    """Slab path for rows [row0, row_end): fp32 score slabs of bounded size, then one selection program per row."""
    _, h_i, d_i = q_idx.shape
    t_total = k_idx.shape[0]
    kp = triton.next_power_of_2(topk)
    bm, bn, warps = tile
    dev = q_idx.device
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
            q_idx, k_idx, w, starts, slab, w if k_scale is None else k_scale,
            row0, n_rows, col0, n_cols, t_total, d_i**-0.5, 1,
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w.stride(0), slab.stride(0),
            H=h_i, DI=d_i, BM=bm, BN=bn, HAS_KS=k_scale is not None,
            q_shift=q_row0 * q_idx.stride(0), w_shift=q_row0 * w.stride(0), num_warps=warps,
        )  # fmt: skip
        if select:
            if scratch.shape[0] < n_rows:
                scratch = torch.empty((n_rows, cap), device=dev, dtype=torch.int64)
            _topk_select_kernel[(n_rows,)](
                slab, starts, scratch, indices, scores, row0, col0, slab.stride(0),
                TOPK=topk, KP=kp, BLOCK=select_block, CAP=cap, SAMPLE=sample, FORCE_RADIX=force_radix,
                q_row0=q_row0, num_warps=8,
            )  # fmt: skip
        row0 = row1


def _fused_rows(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, starts: Tensor, starts_host: list[int], row0: int, row_end: int,
    indices: Tensor, scores: Tensor, topk: int, cap: int, scratch_bytes: int, sample_max: int, sample_stride: int,
    tile: tuple[int, int, int], fused_tile: tuple[int, int, int], k_scale: Tensor | None = None,
    select_warps: int = 4, q_row0: int = 0, resident_tile: tuple | None = None,
) -> list[tuple[int, int]]:  # fmt: skip
    """Fused path for rows [row0, row_end); returns the row ranges whose threshold missed (for the slab path)."""
    _, h_i, d_i = q_idx.shape
    t_total = k_idx.shape[0]
    kp = triton.next_power_of_2(topk)
    bm, bn, warps = tile
    fbm, fbn, fwarps = fused_tile
    dev = q_idx.device
    per_row = cap * 8 + sample_max * 4  # candidates (fp32 score + int32 index) and the score sample
    rows_per_chunk = max(fbm, (scratch_bytes // per_row) // fbm * fbm)
    missed: list[tuple[int, int]] = []
    tau = torch.empty(t_total, device=dev, dtype=torch.float32)
    w_folded = (w.float() * d_i**-0.5).contiguous()  # the compaction's scale folded into the head weights
    while row0 < row_end:
        row1 = min(row_end, row0 + rows_per_chunk)
        n_rows = row1 - row0
        col0 = min(starts_host[row0:row1])
        window = row1 - col0
        cstride = max(1, sample_stride, -(-window // sample_max))
        n_cols = -(-window // cstride)
        smax = max(16, triton.next_power_of_2(n_cols))
        samp = torch.empty((n_rows, smax), device=dev, dtype=torch.float32)
        _indexer_scores_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
            q_idx, k_idx, w, starts, samp, w if k_scale is None else k_scale,
            row0, n_rows, col0, n_cols, t_total, d_i**-0.5, cstride,
            q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w.stride(0), samp.stride(0),
            H=h_i, DI=d_i, BM=bm, BN=bn, HAS_KS=k_scale is not None,
            q_shift=q_row0 * q_idx.stride(0), w_shift=q_row0 * w.stride(0), num_warps=warps,
        )  # fmt: skip
        _sample_threshold_kernel[(n_rows,)](
            samp, starts, tau, row0, col0, cstride, n_cols, samp.stride(0),
            TOPK=topk, CAP=cap, SMAX=smax, num_warps=4,
        )  # fmt: skip
        del samp
        scr_s = torch.empty((n_rows, cap), device=dev, dtype=torch.float32)
        scr_i = torch.empty((n_rows, cap), device=dev, dtype=torch.int32)
        cnt = torch.empty(n_rows, device=dev, dtype=torch.int32)
        if (
            resident_tile is not None
        ):  # all heads' queries resident, one dot per key tile (indexer_resident.py)
            from keye.kernels.indexer_resident import launch_resident

            launch_resident(
                q_idx, k_idx, w_folded, starts, row0, n_rows, 2, resident_tile, tau, scr_s, scr_i, cnt, k_scale,
                cap=cap, q_row0=q_row0,
            )  # fmt: skip
        else:
            _scores_compact_kernel[(triton.cdiv(n_rows, fbm),)](
                q_idx, k_idx, w_folded, starts, tau, scr_s, scr_i, cnt, w if k_scale is None else k_scale,
                row0, n_rows, t_total, d_i**-0.5,
                q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w_folded.stride(0),
                H=h_i, DI=d_i, BM=fbm, BN=fbn, CAP=cap, HAS_KS=k_scale is not None, FOLDED=True,
                q_shift=q_row0 * q_idx.stride(0), w_shift=q_row0 * w_folded.stride(0), num_warps=fwarps,
            )  # fmt: skip
        miss = torch.zeros(n_rows, device=dev, dtype=torch.int32)
        _select_candidates_kernel[(n_rows,)](
            scr_s, scr_i, cnt, starts, indices, scores, miss, row0, TOPK=topk, KP=kp, CAP=cap, q_row0=q_row0,
            num_warps=select_warps,
        )  # fmt: skip
        bad = torch.nonzero(miss).flatten().tolist()
        for r in bad:  # contiguous runs of missed rows
            if missed and missed[-1][1] == row0 + r:
                missed[-1] = (missed[-1][0], row0 + r + 1)
            else:
                missed.append((row0 + r, row0 + r + 1))
        row0 = row1
    return missed


def indexer_topk(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    cu_seqlens: Tensor,
    topk: int,
    block: int = 1024,
    slab_bytes: int = 1 << 31,
    select_block: int = 2048,
    cap: int = 0,
    sample: int = 1024,
    force_radix: bool = False,
    tile: tuple[int, int, int] = (64, 128, 8),
    select: bool = True,
    method: str = "fused",
    scratch_bytes: int = 8 << 30,
    sample_max: int = 8192,
    sample_stride: int = 0,
    fused_tile: tuple[int, int, int] = (64, 128, 4),
    k_scale: Tensor | None = None,
    q_row0: int = 0,
    resident_tile: tuple | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `indexer_topk_reference`; `block` is unused (kept for signature parity).

    q_row0 (context parallelism): q_idx and w hold only the query rows [q_row0, q_row0 + n) of the T rows that
    k_idx and cu_seqlens describe (n <= T - q_row0); the outputs are [n, topk] for those rows (global key ids), the
    rows being scored against every key of their sample (other ranks' rows included). 0: the whole pack.

    method "fused" (default): per-row thresholds from a strided sample of the scores (every `sample_stride`-th key,
    default cap / 128 so that the threshold's sample rank is ~64 and the candidate count lands within a factor 2
    of cap / 2 with margin; at most `sample_max` keys per row), then one kernel recomputes the scores tile by tile and keeps only the keys at or above the threshold
    (at most `cap` per row, in index order; the score matrix is never stored), then the exact top-k of those;
    rows whose threshold missed are redone on the slab path. method "slab": fp32 score slabs under `slab_bytes`,
    then one selection program per row (`_radix_topk_row`; `select_block`, `sample`, `force_radix` tune it).
    k_scale: float32 [T] per-key scales of FP8 keys (keye/kernels/indexer_fp8.py): scores are multiplied by them.
    Every setting gives the same result. cap: a power of two >= 2 * next_pow2(topk) (default 4x). tile / fused_tile
    = (rows, keys, warps) of the score kernels; select=False (slab) computes the score slabs only (for timing).
    scratch_bytes bounds the fused path's candidate buffers (8 * cap bytes per row): more rows per launch means
    more programs in flight (H200, 128K: 1 GiB 166 ms, 4 GiB 134 ms, 8 GiB 119 ms; bench/RESULTS.md).
    resident_tile = (BM, BN, warps, stages, kmajor[, hsum_mma, perm, trans, swp]): the fused path's score + compact kernel keeps all
    heads' queries resident (keye/kernels/indexer_resident.py) instead of looping over heads; None: the loop."""
    del block
    n_q, h_i, d_i = q_idx.shape
    t_total = k_idx.shape[0]
    if q_row0 < 0 or q_row0 + n_q > t_total:
        raise ValueError(f"query rows [{q_row0}, {q_row0 + n_q}) are not within the {t_total} key rows")
    if method not in ("fused", "slab"):
        raise ValueError(f"method must be 'fused' or 'slab', got {method!r}")
    indices, scores = empty_selection(q_idx, topk)
    q_idx, k_idx, w = q_idx.contiguous(), k_idx.contiguous(), w.contiguous()
    if k_scale is not None:
        k_scale = k_scale.float().contiguous()
    if n_q == 0 or topk == 0:
        return indices, scores
    starts = row_starts(cu_seqlens, t_total)
    starts_host = starts.tolist()
    kp = triton.next_power_of_2(topk)
    cap = cap or 4 * kp
    if cap & (cap - 1) or cap < 2 * kp:
        raise ValueError(f"cap {cap} must be a power of two >= 2 * next_pow2(topk) = {2 * kp}")
    if sample_max & (sample_max - 1):
        raise ValueError(f"sample_max {sample_max} must be a power of two")
    row0, row_end = max(int(cu_seqlens[0]), q_row0), min(int(cu_seqlens[-1]), q_row0 + n_q)
    slab = (slab_bytes, select_block, sample, force_radix, tile)
    if method == "slab" or force_radix or not select:
        _slab_rows(
            q_idx, k_idx, w, starts, starts_host, row0, row_end, indices, scores, topk, cap, *slab, select,
            k_scale, q_row0,
        )  # fmt: skip
        return indices, scores
    missed = _fused_rows(
        q_idx, k_idx, w, starts, starts_host, row0, row_end, indices, scores, topk, cap, scratch_bytes,
        sample_max, sample_stride or max(1, cap // 128), tile, fused_tile, k_scale, q_row0=q_row0,
        resident_tile=resident_tile,
    )  # fmt: skip
    for a, b in missed:
        _slab_rows(
            q_idx, k_idx, w, starts, starts_host, a, b, indices, scores, topk, cap, *slab, True, k_scale, q_row0,
        )  # fmt: skip
    return indices, scores


__all__ = ["empty_selection", "indexer_topk", "row_starts"]
