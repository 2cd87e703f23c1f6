"""DSA decode step: one new token per sequence against a long KV cache and its indexer key cache (Triton).

Follows DeepSeek-V3.2-Exp's decode path (index scores of the new token over the indexer key cache, top-k, sparse
attention over the selected cached rows), adapted to GQA. The top-k is split in two so a few long rows still fill
the GPU: each segment of a row keeps its own exact top-k (ties to the smaller index), then one program per row
selects among the segment winners; under the strict (score desc, index asc) order the global top-k is always a
subset of the segment winners, so the result equals the single-pass selection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keye.kernels.indexer_topk import _radix_topk_row
from keye.kernels.sparse_attention import sparse_attention_fwd


@triton.jit
def _decode_scores_kernel(
    QI, KI, W, LENS, OUT, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_wb, stride_ob,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """OUT[b, s] = I[b, s] for s < LENS[b] (the cache rows, the new token's own key included)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    n = tl.load(LENS + b)
    cmask = cols < n
    offs_j = tl.arange(0, HIP)
    offs_d = tl.arange(0, DI)
    jmask = offs_j < HI
    q = tl.load(
        QI + b * stride_qb + offs_j[:, None] * stride_qh + offs_d[None, :], mask=jmask[:, None], other=0.0
    )
    wt = tl.load(W + b * stride_wb + offs_j, mask=jmask, other=0.0).to(tl.float32)
    kt = tl.load(
        KI + b * stride_kb + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
        mask=cmask[None, :],
        other=0.0,
    )
    x = tl.dot(q, kt) * scale
    score = tl.sum(wt[:, None] * tl.maximum(x, 0.0), 0)
    tl.store(OUT + b * stride_ob + cols, score, mask=cmask)


@triton.jit
def _segment_topk_kernel(
    SCORES, LENS, SCR, CAND_IDX, CAND_SCORE, stride_sb, seg_len, n_seg,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    sg = tl.program_id(1)
    n = tl.load(LENS + b)
    lo = sg * seg_len
    hi = tl.minimum(lo + seg_len, n)
    need = tl.maximum(tl.minimum(hi - lo, TOPK), 0)
    out_row = b * n_seg + sg
    base = SCORES + b * stride_sb
    _radix_topk_row(
        base, base, lo, hi, 0, need, SCR + out_row * KP, CAND_IDX, CAND_SCORE, out_row, TOPK, KP, BLOCK, False
    )


@triton.jit
def _merge_topk_kernel(
    CAND_IDX, CAND_SCORE, LENS, SCR, OUT_IDX, OUT_SCORE, n_cand,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(LENS + b)
    need = tl.minimum(n, TOPK)
    base = CAND_SCORE + b * n_cand
    ibase = CAND_IDX + b * n_cand
    _radix_topk_row(
        base, ibase, 0, n_cand, 0, need, SCR + b * KP, OUT_IDX, OUT_SCORE, b, TOPK, KP, BLOCK, True
    )


def decode_topk(
    q_idx: Tensor, k_idx_cache: Tensor, w: Tensor, cache_lens: Tensor, topk: int, seg_len: int = 16384
) -> tuple[Tensor, Tensor]:
    """Top-k cache rows for each sequence's new token: q_idx [B,H_I,D_I], k_idx_cache [B,L,D_I], w [B,H_I],
    cache_lens int32 [B] (rows valid, the new token's included). Returns (indices int32 [B,topk] cache rows sorted by
    score desc, ties to the smaller row, -1 padded; scores f32 [B,topk], -inf padded)."""
    bsz, h_i, d_i = q_idx.shape
    lmax = k_idx_cache.shape[1]
    dev = q_idx.device
    q_idx, k_idx_cache, w = q_idx.contiguous(), k_idx_cache.contiguous(), w.contiguous()
    lens = cache_lens.to(torch.int32).contiguous()
    scores = torch.empty((bsz, lmax), device=dev, dtype=torch.float32)
    bn = 128
    _decode_scores_kernel[(bsz, triton.cdiv(lmax, bn))](
        q_idx, k_idx_cache, w, lens, scores, d_i**-0.5,
        q_idx.stride(0), q_idx.stride(1), k_idx_cache.stride(0), k_idx_cache.stride(1), w.stride(0), scores.stride(0),
        HI=h_i, HIP=max(16, triton.next_power_of_2(h_i)), DI=d_i, BN=bn, num_warps=4,
    )  # fmt: skip
    kp = triton.next_power_of_2(topk)
    cap = 2 * kp
    seg_len = max(seg_len, topk)
    n_seg = triton.cdiv(lmax, seg_len)
    out_idx = torch.empty((bsz, topk), device=dev, dtype=torch.int32)
    out_score = torch.empty((bsz, topk), device=dev, dtype=torch.float32)
    if n_seg == 1:
        scr = torch.empty((bsz, cap), device=dev, dtype=torch.int64)
        _segment_topk_kernel[(bsz, 1)](
            scores, lens, scr, out_idx, out_score, scores.stride(0), seg_len, 1,
            TOPK=topk, KP=kp, BLOCK=1024, CAP=cap, num_warps=8,
        )  # fmt: skip
        return out_idx, out_score
    cand_idx = torch.empty((bsz * n_seg, topk), device=dev, dtype=torch.int32)
    cand_score = torch.empty((bsz * n_seg, topk), device=dev, dtype=torch.float32)
    scr = torch.empty((bsz * n_seg, cap), device=dev, dtype=torch.int64)
    _segment_topk_kernel[(bsz, n_seg)](
        scores, lens, scr, cand_idx, cand_score, scores.stride(0), seg_len, n_seg,
        TOPK=topk, KP=kp, BLOCK=1024, CAP=cap, num_warps=8,
    )  # fmt: skip
    _merge_topk_kernel[(bsz,)](
        cand_idx, cand_score, lens, scr, out_idx, out_score, n_seg * topk,
        TOPK=topk, KP=kp, BLOCK=1024, CAP=cap, num_warps=8,
    )  # fmt: skip
    return out_idx, out_score


def dsa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_idx: Tensor,
    k_idx_cache: Tensor,
    w: Tensor,
    cache_lens: Tensor,
    topk: int,
    scale: float,
    seg_len: int = 16384,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DSA decode step. q [B,Hq,D]; k_cache, v_cache [B,L,Hkv,D]; indexer tensors as `decode_topk`.
    Returns (o [B,Hq,D], lse f32 [B,Hq], indices int32 [B,topk] cache rows)."""
    bsz, lmax = k_cache.shape[0], k_cache.shape[1]
    indices, _ = decode_topk(q_idx, k_idx_cache, w, cache_lens, topk, seg_len)
    base = (torch.arange(bsz, device=q.device, dtype=torch.int32) * lmax)[:, None]
    flat_idx = torch.where(indices >= 0, indices + base, indices)
    k_flat = k_cache.reshape(bsz * lmax, *k_cache.shape[2:])
    v_flat = v_cache.reshape(bsz * lmax, *v_cache.shape[2:])
    o, lse = sparse_attention_fwd(q, k_flat, v_flat, flat_idx, scale)
    return o, lse, indices


__all__ = ["decode_topk", "dsa_decode"]
