"""Two-pass lightning-indexer top-k: an experiment of issue 20, not the library path (measured slower than the fused
kernel at 128K with either select: bench/RESULTS.md `## dsa`; kept so the measurement can be repeated).

Why: in the fused path (keye/kernels/indexer_topk.py) the compaction of the keys above a sampled threshold runs
inside the score loop, over every (row, key) pair (~30 of its ~63 ms at 128K, FP8), and the exact select over the
candidates takes another ~22 ms. Here the score loop does nothing but score: (1) one Triton kernel writes the scores
of a chunk of query rows as a 16-bit slab (-inf outside each row's causal window), with plain vector stores (the
library's head loop, or the resident-query kernel of indexer_resident.py); (2) the selection reads the slab:
torch.topk (a radix select per row in CUDA) and a sort of the k picked indices into ascending order, or
(selector="triton") one exact Triton radix select per row over its window, which writes the picks in ascending
order with the reference's tie rule and needs no sort. The slab costs 2 bytes per (row, key) of a chunk
(`slab_bytes` bounds a chunk).

Contract as `dsa_reference.indexer_topk_reference` (top-k in ascending index order, -1 / -inf padding), except
that scores are rounded to the slab's dtype before the selection: near-ties can flip (stated as top-k recall against
the fp32-score path). ties="lowest" applies the reference's rule (ties to the smaller index; exact with a float32
slab: the CPU interpreter test), ties="any" leaves torch.topk's choice among equal scores (the fast setting).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keye.kernels.dsa_reference import topk_lowest_index_ties
from keye.kernels.indexer_resident import launch_resident
from keye.kernels.indexer_topk import _index_scores_tile, empty_selection, row_starts


@triton.jit
def _scores_slab_kernel(
    QI, KI, W, ROW_START, OUT, KS,
    row0, n_rows, col0, n_cols, n_keys,
    stride_qt, stride_qh, stride_kt, stride_wt, stride_o,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_KS: tl.constexpr,
):  # fmt: skip
    """OUT[r, c] = I[row0 + r, col0 + c] inside row r's causal window [start, row], -inf elsewhere (every tile
    of the slab is written; tiles outside all windows without computing). W holds w / sqrt(D_I) (folded)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r_loc = pid_m * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    c_loc = pid_n * BN + tl.arange(0, BN)
    cols = col0 + c_loc
    cmask = c_loc < n_cols
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid_m * BM + BM, n_rows) - 1
    acc = tl.full([BM, BN], float("-inf"), tl.float32)
    if (col0 + pid_n * BN <= hi) and (col0 + pid_n * BN + BN - 1 >= lo):
        offs_d = tl.arange(0, DI)
        kmask = (cols < n_keys) & cmask
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0
        )
        acc = _index_scores_tile(
            QI, W, rows, rmask, kt, 1.0, stride_qt, stride_qh, stride_wt, H, DI, BM, BN, True
        )
        if HAS_KS:
            acc = acc * tl.load(KS + cols, mask=kmask, other=0.0)[None, :]
        inwin = (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])
        acc = tl.where(inwin, acc, float("-inf"))
    dst = OUT + r_loc[:, None].to(tl.int64) * stride_o + c_loc[None, :]
    tl.store(dst, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _chunks(starts_host: list[int], row0: int, row_end: int, bm: int, budget: int, elem: int):
    """Row chunks [a, b) with window start c0 whose (b - a) x (b - c0) slab fits `budget` bytes."""
    while row0 < row_end:
        row1, col0 = min(row_end, row0 + bm), min(starts_host[row0 : min(row_end, row0 + bm)])
        while row1 < row_end:
            nxt = min(row_end, row1 + bm)
            c0 = min(col0, min(starts_host[row1:nxt]))
            if (nxt - row0) * (nxt - c0) * elem > budget:
                break
            row1, col0 = nxt, c0
        yield row0, row1, col0
        row0 = row1


def score_slab(
    q_idx: Tensor, k_idx: Tensor, w_folded: Tensor, starts: Tensor, row0: int, row1: int, col0: int,
    slab_dtype: torch.dtype, tile: tuple, k_scale: Tensor | None, fill: bool = True,
) -> Tensor:  # fmt: skip
    """Pass 1: the [row1 - row0, row1 - col0] score slab of rows [row0, row1) (-inf outside their windows).
    tile (BM, BN, warps): the library's head loop (`_index_scores_tile`); a longer tuple is a resident-query tile
    (keye/kernels/indexer_resident.py: one dot per key tile for all heads), which writes only the key tiles its
    programs' windows touch: the rest is -inf-filled first unless fill=False (a reader of the windows alone)."""
    n_rows, n_cols = row1 - row0, row1 - col0
    slab = torch.empty((n_rows, n_cols), device=q_idx.device, dtype=slab_dtype)
    if len(tile) > 3:
        if fill:
            slab.fill_(float("-inf"))
        launch_resident(  # keys [0, row1): no tile stores past the slab's last column
            q_idx, k_idx[:row1], w_folded, starts, row0, n_rows, 0, tile, k_scale=k_scale, out=slab, out_col0=col0,
        )  # fmt: skip
        return slab
    bm, bn, warps = tile
    _scores_slab_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
        q_idx, k_idx, w_folded, starts, slab, w_folded if k_scale is None else k_scale,
        row0, n_rows, col0, n_cols, q_idx.shape[0],
        q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w_folded.stride(0), slab.stride(0),
        H=q_idx.shape[1], DI=q_idx.shape[2], BM=bm, BN=bn, HAS_KS=k_scale is not None, num_warps=warps,
    )  # fmt: skip
    return slab


def select_slab(slab: Tensor, topk: int, ties: str = "any") -> tuple[Tensor, Tensor]:
    """Pass 2: (columns int64 [R, topk] ascending, -1 padded; their scores f32, -inf padded) of each row's top-k."""
    if (
        ties == "lowest"
    ):  # its -inf padding may come first (keys of an earlier sample in the chunk): reordered
        vals, cols = topk_lowest_index_ties(slab.float(), topk)
        kk = topk
    else:
        kk = min(topk, slab.shape[1])
        vals, cols = torch.topk(slab, kk, dim=1, sorted=False)
    big = torch.iinfo(torch.int64).max
    order_key, perm = torch.where(torch.isfinite(vals), cols, big).sort(dim=1)
    vals = vals.gather(1, perm).float()
    cols = torch.where(order_key == big, -1, order_key)
    if kk < topk:
        pad = topk - kk
        cols = torch.cat([cols, cols.new_full((cols.shape[0], pad), -1)], 1)
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("-inf"))], 1)
    return cols, vals


@triton.jit
def _key16(x):
    """fp16 scores -> int32 keys in [0, 65536) with the order of the scores (sign bit flipped; negatives inverted)."""
    b = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b = tl.where(b == 0x8000, 0, b)  # -0.0 ties with +0.0, as the scores compare
    return tl.where((b & 0x8000) != 0, (~b) & 0xFFFF, b | 0x8000)


@triton.jit
def _byte_histogram(hist, byte, valid, CH: tl.constexpr):
    """hist (256 int32) += the counts of `byte` over the valid lanes (invalid lanes are counted in bin 0, then
    taken off)."""
    bins = tl.arange(0, 256)
    h = tl.histogram(tl.where(valid, byte, 0), 256)
    return hist + h - tl.where(bins == 0, CH - tl.sum(valid.to(tl.int32)), 0)


@triton.jit
def _top_bin(hist, need):
    """(the largest bin b with count(bins >= b) >= need, count(bins > b)); need >= 1 and sum(hist) >= need."""
    bins = tl.arange(0, 256)
    above_incl = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # count of bins >= b
    b = tl.max(tl.where(above_incl >= need, bins, -1))
    return b, tl.sum(tl.where(bins > b, hist, 0))


@triton.jit
def _slab_select_kernel(
    SLAB, LO, HI, OUT_I, OUT_S, col0, stride_s, stride_o,
    K: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    """One row of a 16-bit slab: its top-K over slab columns [LO[r], HI[r]], ties to the smaller column, written
    in ascending column order (global column = slab column + col0), -1 / -inf padded. An exact radix select on the
    16-bit keys: a histogram of the high bytes, one of the low bytes inside the boundary bin, then one pass that
    writes the keys above the K-th and the first equal ones."""
    r = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)  # longest windows first (causal slabs)
    lo = tl.load(LO + r)
    hi = tl.load(HI + r)
    base = SLAB + r * stride_s
    offs = tl.arange(0, CH)
    total = tl.maximum(hi - lo + 1, 0)
    hist = tl.zeros([256], tl.int32)
    for c in range(lo, hi + 1, CH):
        m = c + offs <= hi
        key = _key16(tl.load(base + c + offs, mask=m, other=0.0))
        hist = _byte_histogram(hist, key >> 8, m, CH)
    kstar = -1  # take every key of a window shorter than K
    ties = 0
    if total > K:
        b1, above1 = _top_bin(hist, K)
        hist2 = tl.zeros([256], tl.int32)
        for c in range(lo, hi + 1, CH):
            m = c + offs <= hi
            key = _key16(tl.load(base + c + offs, mask=m, other=0.0))
            hist2 = _byte_histogram(hist2, key & 255, m & ((key >> 8) == b1), CH)
        b2, above2 = _top_bin(hist2, K - above1)
        kstar = b1 * 256 + b2
        ties = K - above1 - above2  # keys equal to the K-th taken, lowest columns first
    written = 0
    seen = 0
    for c in range(lo, hi + 1, CH):
        m = c + offs <= hi
        x = tl.load(base + c + offs, mask=m, other=0.0)
        key = _key16(x)
        eq = m & (key == kstar)
        rank = seen + tl.cumsum(eq.to(tl.int32), 0) - 1
        sel = (m & (key > kstar)) | (eq & (rank < ties))
        pos = written + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(OUT_I + r * stride_o + pos, (c + offs + col0).to(tl.int32), mask=sel)
        tl.store(OUT_S + r * stride_o + pos, x.to(tl.float32), mask=sel)
        written += tl.sum(sel.to(tl.int32))
        seen += tl.sum(eq.to(tl.int32))
    pad = tl.arange(0, KP)
    pm = (pad >= written) & (pad < K)
    tl.store(OUT_I + r * stride_o + pad, tl.full([KP], -1, tl.int32), mask=pm)
    tl.store(OUT_S + r * stride_o + pad, tl.full([KP], float("-inf"), tl.float32), mask=pm)


def select_slab_triton(
    slab: Tensor, lo: Tensor, hi: Tensor, col0: int, out_i: Tensor, out_s: Tensor, topk: int, chunk: int = 4096,
    warps: int = 4,
) -> None:  # fmt: skip
    """Pass 2 in one Triton kernel: out_i / out_s [R, topk] (int32 / f32 views of the result rows) of each slab
    row's top-k over its columns [lo, hi] (int32 [R]), as `topk_lowest_index_ties` on the slab's 16-bit values."""
    if slab.dtype != torch.float16:
        raise ValueError(f"the Triton selection reads a float16 slab, got {slab.dtype}")
    _slab_select_kernel[(slab.shape[0],)](
        slab, lo, hi, out_i, out_s, col0, slab.stride(0), out_i.stride(0),
        K=topk, KP=triton.next_power_of_2(topk), CH=chunk, num_warps=warps,
    )  # fmt: skip


def indexer_topk_twopass(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    cu_seqlens: Tensor,
    topk: int,
    block: int = 1024,
    slab_dtype: torch.dtype = torch.float16,
    slab_bytes: int = 4 << 30,
    tile: tuple = (64, 128, 4),
    ties: str = "any",
    k_scale: Tensor | None = None,
    select: bool = True,
    selector: str = "torch",
    select_chunk: int = 4096,
    select_warps: int = 4,
) -> tuple[Tensor, Tensor]:
    """(indices int32 [T, topk], scores f32 [T, topk]) as `indexer_topk_reference` on scores rounded to
    `slab_dtype`; k_scale: per-key scales of FP8 keys (keye/kernels/indexer_fp8.py). select=False runs pass 1
    only (for timing). selector "triton": pass 2 as one Triton radix select per row (float16 slab, the
    reference's tie rule, no sort), "torch": torch.topk + sort (`ties`)."""
    del block
    t_total, _, d_i = q_idx.shape
    if ties not in ("any", "lowest"):
        raise ValueError(f"ties must be 'any' or 'lowest', got {ties!r}")
    if selector not in ("torch", "triton"):
        raise ValueError(f"selector must be 'torch' or 'triton', got {selector!r}")
    indices, scores = empty_selection(q_idx, topk)
    if t_total == 0 or topk == 0:
        return indices, scores
    q_idx, k_idx = q_idx.contiguous(), k_idx.contiguous()
    w_folded = (w.float() * d_i**-0.5).contiguous()
    if k_scale is not None:
        k_scale = k_scale.float().contiguous()
    starts = row_starts(cu_seqlens, t_total)
    elem = torch.empty((), dtype=slab_dtype).element_size()
    for row0, row1, col0 in _chunks(
        starts.tolist(), int(cu_seqlens[0]), int(cu_seqlens[-1]), tile[0], slab_bytes, elem
    ):
        torch_select = select and selector == "torch"  # reads whole slab rows; the Triton select only windows
        slab = score_slab(
            q_idx, k_idx, w_folded, starts, row0, row1, col0, slab_dtype, tile, k_scale, fill=torch_select
        )  # fmt: skip
        if select and not torch_select:
            lo = (starts[row0:row1] - col0).to(torch.int32)
            hi = torch.arange(row0 - col0, row1 - col0, device=slab.device, dtype=torch.int32)
            select_slab_triton(
                slab, lo, hi, col0, indices[row0:row1], scores[row0:row1], topk, select_chunk, select_warps
            )
        elif torch_select:
            cols, vals = select_slab(slab, topk, ties)
            indices[row0:row1] = torch.where(cols >= 0, cols + col0, -1).to(torch.int32)
            scores[row0:row1] = vals
    return indices, scores


__all__ = ["indexer_topk_twopass", "score_slab", "select_slab", "select_slab_triton"]
