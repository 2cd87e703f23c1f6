"""DSA decode step: one new token per sequence against a long KV cache and its indexer key cache (Triton).

Follows DeepSeek-V3.2-Exp's decode path (index scores of the new token over the indexer key cache, top-k, sparse
attention over the selected cached rows), adapted to GQA and laid out for latency, since a decode step moves little
data (the indexer keys and 2048 K/V rows per sequence) and is dominated by serial chains inside single programs:
1. `_decode_sample_kernel` (sequences x sample slices): scores of a strided sample of the cache rows (4096), and
   `_decode_tau_kernel` (one program per sequence): the sample's threshold, expected to leave about sqrt(k * CAP)
   rows at or above it (CAP = 2 * next_pow2(k) candidate slots; 0 misses in 512 random draws at 128K).
2. `_decode_scores_compact_kernel` (sequences x segments of `seg_len` rows): every score of its segment, and the rows
   at or above the threshold compacted in row order.
3. `_decode_select_kernel` (one program per sequence): the segments' candidates, concatenated in row order, give the
   exact top-k (bit search, ties to the smaller row, ascending order). If the threshold left fewer than k or more
   than CAP candidates (heavy ties), the exact radix select over the stored scores decides instead (slow, rare),
   run by a second program per sequence of the same kernel.
4. Split-K sparse attention over the selected rows (sequences x KV heads x splits), then a merge of the partial
   softmaxes. Everything stays on the device (no host sync), so the step can be captured in a CUDA graph, as a
   serving loop does (bench/dsa.py times both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keye.kernels.indexer_topk import (
    _emit_selected,
    _from_order_key,
    _kth_key,
    _order_key,
    _radix_topk_row,
)
from keye.kernels.sparse_attention import _gathered_softmax_step, _softmax_result

# bits of the sampled threshold: 16 of an fp32 score are within 2^-7 of it, and the search is half as long (the
# threshold kernel was 11 us of the step at 32 rounds)
TAU_BITS: tl.constexpr = tl.constexpr(16)


@triton.jit
def _index_query(
    QI, W, KI, b, stride_qb, stride_qh, stride_wb, HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr,
    QUANT: tl.constexpr = False,
):  # fmt: skip
    """The new token's indexer queries [HIP, DI] (heads padded to HIP for the tensor-core dot) and weights [HIP].
    QUANT: the query arrives in the model dtype and is made e4m3 here, one scale per head folded into its weight,
    exactly as keye.kernels.indexer_fp8.quantize_indexer_query does in torch (in KI's element type: e4m3 on the
    GPU, e4m3-rounded float32 under the interpreter), which saves ~8 launches of a decode step."""
    offs_j = tl.arange(0, HIP)
    jmask = offs_j < HI
    q = tl.load(
        QI + b * stride_qb + offs_j[:, None] * stride_qh + tl.arange(0, DI)[None, :],
        mask=jmask[:, None],
        other=0.0,
    )
    wt = tl.load(W + b * stride_wb + offs_j, mask=jmask, other=0.0).to(tl.float32)
    if QUANT:
        qf = q.to(tl.float32)
        sq = tl.maximum(tl.max(tl.abs(qf), 1), 1e-12) / 448.0  # E4M3_MAX
        q = _round_e4m3(qf / sq[:, None]).to(KI.dtype.element_ty)
        wt = wt * sq
    return q, wt


@triton.jit
def _round_e4m3(x):
    """float32 -> the nearest e4m3fn value (ties to even, saturated to +-448, as quantize_rows clamps), still float32:
    3 mantissa bits by integer rounding of the fp32 bits above 2^-6, multiples of 2^-9 below (the subnormals).
    Arithmetic rather than a cast so the interpreter (whose fp8 cast drops a carry into the exponent: 7.86 -> 4.0)
    computes what the GPU does; the result is exact in e4m3, so the cast to the cache's dtype after it is too."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    sub = (x + 24576.0) - 24576.0  # 1.5 * 2^14: x + it stays in [2^14, 2^15), whose ulp is 2^-9
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def _decode_sample_kernel(
    QI, KI, W, LENS, SAMP, KS, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_wb, stride_ksb,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, S: tl.constexpr, BS: tl.constexpr, CAP: tl.constexpr,
    HAS_KS: tl.constexpr = False, QUANT: tl.constexpr = False,
):  # fmt: skip
    """SAMP[b, i] = score of cache row i * n / S, for the BS sample slots of this program (sequences of at most
    CAP rows need no threshold and are skipped). Many small programs: one per sequence was the step's longest
    serial chain (65 us at batch 8, 128K cache)."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(LENS + b)
    if n > CAP:
        i = tl.program_id(1) * BS + tl.arange(0, BS)
        rows = (i.to(tl.int64) * n) // S
        q, wt = _index_query(QI, W, KI, b, stride_qb, stride_qh, stride_wb, HI, HIP, DI, QUANT)
        kt = tl.load(KI + b * stride_kb + rows[None, :] * stride_kt + tl.arange(0, DI)[:, None])
        sc = tl.sum(wt[:, None] * tl.maximum(tl.dot(q, kt) * scale, 0.0), 0)
        if HAS_KS:  # FP8 indexer key cache: per-row scale
            sc = sc * tl.load(KS + b * stride_ksb + rows)
        tl.store(SAMP + b * S + i, sc)


@triton.jit
def _sample_tau(SAMP, b, n, target, S: tl.constexpr, CAP: tl.constexpr):
    """The threshold: the sample score of rank ~target * S/n (expected to leave about `target` rows at or above it);
    -inf (take every row) for sequences of at most CAP rows."""
    tau = float("-inf")
    if n > CAP:
        i = tl.arange(0, S)
        sc = tl.load(SAMP + b * S + i)
        rank = tl.minimum((target * S / n.to(tl.float32)).to(tl.int32) + 1, S)
        tau = _from_order_key(_kth_key(_order_key(sc), i < S, rank, TAU_BITS))
    return tau


@triton.jit
def _decode_tau_kernel(SAMP, LENS, TAU, target, S: tl.constexpr, CAP: tl.constexpr):
    """TAU[b] = `_sample_tau` once per sequence (one program per sequence: in each compaction program instead it
    lengthened all of them)."""
    b = tl.program_id(0).to(tl.int64)
    tl.store(TAU + b, _sample_tau(SAMP, b, tl.load(LENS + b), target, S, CAP))


@triton.jit
def _decode_scores_compact_kernel(
    QI, KI, W, LENS, TAU, SCORES, CAND_S, CAND_I, SEGCNT, KS, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_wb, stride_ksb, stride_sb, n_seg,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, SEG: tl.constexpr, BN: tl.constexpr,
    HAS_KS: tl.constexpr = False, QUANT: tl.constexpr = False,
):  # fmt: skip
    """Scores of one segment of rows (stored: the fallback needs them) and its rows at or above TAU[b], compacted
    in row order into CAND_S / CAND_I[(b * n_seg + sg) * SEG ...], their number into SEGCNT[b * n_seg + sg]."""
    b = tl.program_id(0).to(tl.int64)
    sg = tl.program_id(1)
    n = tl.load(LENS + b)
    tau = tl.load(TAU + b)
    q, wt = _index_query(QI, W, KI, b, stride_qb, stride_qh, stride_wb, HI, HIP, DI, QUANT)
    offs_d = tl.arange(0, DI)
    out = (b * n_seg + sg) * SEG
    cnt = tl.zeros([], tl.int32)
    for c0 in range(sg * SEG, tl.minimum(sg * SEG + SEG, n), BN):
        cols = c0 + tl.arange(0, BN)
        cm = cols < n
        kt = tl.load(
            KI + b * stride_kb + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=cm[None, :],
            other=0.0,
        )
        sc = tl.sum(wt[:, None] * tl.maximum(tl.dot(q, kt) * scale, 0.0), 0)
        if HAS_KS:
            sc = sc * tl.load(KS + b * stride_ksb + cols, mask=cm, other=0.0)
        tl.store(SCORES + b * stride_sb + cols, sc, mask=cm)
        take = cm & (sc >= tau)
        take_i = take.to(tl.int32)
        pos = cnt + tl.cumsum(take_i, 0) - 1
        tl.store(CAND_S + out + pos, sc, mask=take)
        tl.store(CAND_I + out + pos, cols, mask=take)
        cnt += tl.sum(take_i, 0)
    tl.store(SEGCNT + b * n_seg + sg, cnt)


@triton.jit
def _decode_select_kernel(
    CAND_S, CAND_I, SEGCNT, ENDS, LENS, OUT_IDX, OUT_SCORE, SCORES, SCR, n_seg, stride_sb,
    TOPK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, NSEG: tl.constexpr, LOG_NSEG: tl.constexpr,
    SEG: tl.constexpr,
):  # fmt: skip
    """Grid [B, 2]. Program (b, 0): the exact top-k of sequence b from its segments' candidates, unless the
    threshold left fewer than k or more than CAP of them; program (b, 1) sees the same counts and then runs the
    exact radix select over the stored scores (a kernel of its own cost a launch; this one returns at once)."""
    b = tl.program_id(0).to(tl.int64)
    role = tl.program_id(1)
    n = tl.load(LENS + b)
    need = tl.minimum(n, TOPK)
    ks = tl.arange(0, NSEG)
    counts = tl.load(SEGCNT + b * n_seg + ks, mask=ks < n_seg, other=0)
    ends = tl.cumsum(counts, 0)
    total = tl.sum(counts, 0)
    hit = (total >= need) & (total <= CAP)
    if role == 0:
        if hit:
            tl.store(ENDS + b * NSEG + ks, ends)
            tl.debug_barrier()
            slots = tl.arange(0, CAP)
            valid = slots < total
            lo = tl.zeros([CAP], tl.int32)  # segment of each slot: first segment whose end is above it
            hi = tl.full([CAP], NSEG, tl.int32)
            for _ in tl.static_range(LOG_NSEG + 1):
                mid = (lo + hi) // 2
                e = tl.load(ENDS + b * NSEG + mid, mask=mid < NSEG, other=2147483647)
                up = e <= slots
                lo = tl.where(up, mid + 1, lo)
                hi = tl.where(up, hi, mid)
            seg = tl.minimum(lo, NSEG - 1)
            seg_end = tl.load(ENDS + b * NSEG + seg)
            seg_cnt = tl.load(SEGCNT + b * n_seg + seg, mask=valid, other=0)
            off = (b * n_seg + seg) * SEG + (slots - (seg_end - seg_cnt))
            sc = tl.load(CAND_S + off, mask=valid, other=float("-inf"))
            gi = tl.load(CAND_I + off, mask=valid, other=-1)
            _emit_selected(_order_key(sc), gi, valid, need, OUT_IDX, OUT_SCORE, b, TOPK, KP)
    elif (total < need) | (total > CAP):
        base = SCORES + b * stride_sb
        _radix_topk_row(
            base, base, 0, n, 0, need, SCR + b * CAP, OUT_IDX, OUT_SCORE, b, TOPK, KP, 1024, False, CAP, 1024, True
        )  # fmt: skip


@triton.jit
def _decode_attn_partial_kernel(
    Q, K, V, IDX, PO, PML, O, LSE, sm_scale_log2,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ib,
    stride_ob, stride_oh, TOPK, n_split,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr,
    FINAL: tl.constexpr,
):  # fmt: skip
    """Unnormalised softmax-weighted sum over one chunk of the selected rows, for the G heads of one KV head;
    PO [B, split, Hq, D] and PML [B, split, Hq, 2] (running max in log2 units, sum of weights). FINAL (one chunk
    covers all rows): the normalised O and LSE (nats) directly, and no merge."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for k0 in range(sp * CHUNK, tl.minimum(sp * CHUNK + CHUNK, TOPK), BK):
        m_i, l_i, acc = _gathered_softmax_step(
            q, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh, IDX + b * stride_ib,
            k0, TOPK, stride_kt, stride_vt, m_i, l_i, acc, sm_scale_log2, D, BK,
        )  # fmt: skip
    hq = tl.num_programs(1) * G
    if FINAL:
        o, lse = _softmax_result(m_i, l_i, acc)
        dst = O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(O.dtype.element_ty), mask=gmask[:, None])
        tl.store(LSE + b * hq + heads, lse, mask=gmask)
    else:
        base = (b * n_split + sp) * hq + heads
        tl.store(PO + base[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
        tl.store(PML + base * 2, m_i, mask=gmask)
        tl.store(PML + base * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_attn_merge_kernel(
    PO, PML, O, LSE, n_split, stride_ob, stride_oh, NSP: tl.constexpr, D: tl.constexpr
):  # fmt: skip
    """Merge the split partials of one (sequence, head): o = sum_s w_s acc_s / sum_s w_s l_s, lse in nats."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hq = tl.num_programs(1)
    sp = tl.arange(0, NSP)
    smask = sp < n_split
    base = (b * n_split + sp) * hq + h
    m = tl.load(PML + base * 2, mask=smask, other=float("-inf"))
    lsum = tl.load(PML + base * 2 + 1, mask=smask, other=0.0)
    mx = tl.max(m, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    wgt = tl.where(smask, tl.exp2(m - mx_safe), 0.0)
    total = tl.sum(wgt * lsum, 0)
    offs_d = tl.arange(0, D)
    acc = tl.load(PO + base[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(wgt[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(
        total > 0, (mx_safe + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453, float("-inf")
    )
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, o.to(O.dtype.element_ty))
    tl.store(LSE + b * hq + h, lse)


@triton.jit
def _write_fp8_rows_kernel(X, C, S, LENS, stride_xb, stride_cb, stride_ct, stride_sb, DI: tl.constexpr):
    """Row b of X, quantised to e4m3 with one scale (amax / 448), into C[b, LENS[b]] and S[b, LENS[b]]."""
    b = tl.program_id(0).to(tl.int64)
    at = tl.load(LENS + b).to(tl.int64)
    d = tl.arange(0, DI)
    x = tl.load(X + b * stride_xb + d).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / 448.0
    q = _round_e4m3(x / s)
    tl.store(C + b * stride_cb + at * stride_ct + d, q.to(C.dtype.element_ty))
    tl.store(S + b * stride_sb + at, s)


def write_fp8_rows(rows: Tensor, cache8: Tensor, scales: Tensor, lengths: Tensor) -> None:
    """A decode step's new indexer keys rows [B, D_I] into an FP8 cache: cache8[b, lengths[b]] (e4m3; float32
    holding e4m3 values under the interpreter) and scales[b, lengths[b]], in one launch instead of the ~6 of
    keye.kernels.indexer_fp8.write_fp8_rows_reference (same values: bench/RESULTS.md `## dsa`, FP8 decode)."""
    bsz, d_i = rows.shape
    if d_i & (d_i - 1):
        raise ValueError(f"indexer dim {d_i} must be a power of two")
    rows = rows.contiguous()
    _write_fp8_rows_kernel[(bsz,)](
        rows, cache8, scales, lengths, rows.stride(0), cache8.stride(0), cache8.stride(1), scales.stride(0),
        DI=d_i, num_warps=1,
    )  # fmt: skip


def decode_topk(
    q_idx: Tensor,
    k_idx_cache: Tensor,
    w: Tensor,
    cache_lens: Tensor,
    topk: int,
    seg_len: int = 2048,
    sample: int = 4096,
    select_warps: int = 16,
    compact_block: int = 128,
    cap: int = 0,
    tau_warps: int = 8,
    k_scale: Tensor | None = None,
    quantize_query: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-k cache rows for each sequence's new token: q_idx [B,H_I,D_I], k_idx_cache [B,L,D_I], w [B,H_I],
    cache_lens int32 [B] (rows valid, the new token's included). Returns (indices int32 [B,topk] cache rows in
    ascending order, ties to the smaller row, -1 padded; scores f32 [B,topk], -inf padded). seg_len: rows per
    compaction program (a power of two); sample: rows scored for the threshold proposal (a power of two); cap:
    candidate slots of the exact select (a power of two >= 2 * next_pow2(topk), the default; fewer slots make the
    select cheaper but need a larger sample to keep threshold misses rare); tau_warps: warps of the threshold
    kernel; select_warps / compact_block: the select kernel's warps and the compaction's rows per step.
    k_scale: f32 [B, L] per-row scales of an FP8 indexer key cache (keye/kernels/indexer_fp8.py; q_idx and w then
    come from `quantize_indexer_query`, or, with quantize_query=True, in the model dtype: the kernels quantise them)."""
    bsz, h_i, d_i = q_idx.shape
    lmax = k_idx_cache.shape[1]
    dev = q_idx.device
    if seg_len & (seg_len - 1) or sample & (sample - 1) or seg_len < 16 or sample < 16:
        raise ValueError(f"seg_len {seg_len} and sample {sample} must be powers of two >= 16")
    q_idx, k_idx_cache, w = q_idx.contiguous(), k_idx_cache.contiguous(), w.contiguous()
    lens = cache_lens.to(torch.int32).contiguous()
    kp = triton.next_power_of_2(topk)
    cap = cap or 2 * kp
    if cap & (cap - 1) or cap < 2 * kp:
        raise ValueError(f"cap {cap} must be a power of two >= 2 * next_pow2(topk) = {2 * kp}")
    target = (topk * cap) ** 0.5  # candidates aimed at: as far (as a ratio) from k as from cap
    hip = max(16, triton.next_power_of_2(h_i))
    n_seg = max(1, triton.cdiv(lmax, seg_len))
    nseg_p = max(2, triton.next_power_of_2(n_seg))
    strides = (q_idx.stride(0), q_idx.stride(1), k_idx_cache.stride(0), k_idx_cache.stride(1), w.stride(0))
    ks = w if k_scale is None else k_scale.float().contiguous()
    strides = (*strides, ks.stride(0))
    samp = torch.empty((bsz, sample), device=dev, dtype=torch.float32)
    bs = min(128, sample)
    _decode_sample_kernel[(bsz, sample // bs)](
        q_idx, k_idx_cache, w, lens, samp, ks, d_i**-0.5, *strides,
        HI=h_i, HIP=hip, DI=d_i, S=sample, BS=bs, CAP=cap, HAS_KS=k_scale is not None, QUANT=quantize_query,
        num_warps=4,
    )  # fmt: skip
    scores = torch.empty((bsz, max(lmax, 1)), device=dev, dtype=torch.float32)
    cand_s = torch.empty((bsz * n_seg * seg_len,), device=dev, dtype=torch.float32)
    cand_i = torch.empty((bsz * n_seg * seg_len,), device=dev, dtype=torch.int32)
    segcnt = torch.empty((bsz * n_seg,), device=dev, dtype=torch.int32)
    tau = torch.empty(bsz, device=dev, dtype=torch.float32)
    _decode_tau_kernel[(bsz,)](samp, lens, tau, target, S=sample, CAP=cap, num_warps=tau_warps)
    _decode_scores_compact_kernel[(bsz, n_seg)](
        q_idx, k_idx_cache, w, lens, tau, scores, cand_s, cand_i, segcnt, ks, d_i**-0.5, *strides,
        scores.stride(0), n_seg, HI=h_i, HIP=hip, DI=d_i, SEG=seg_len, BN=min(compact_block, seg_len),
        HAS_KS=k_scale is not None, QUANT=quantize_query, num_warps=4,
    )  # fmt: skip
    out_idx = torch.empty((bsz, topk), device=dev, dtype=torch.int32)
    out_score = torch.empty((bsz, topk), device=dev, dtype=torch.float32)
    ends = torch.empty((bsz, nseg_p), device=dev, dtype=torch.int32)
    scr = torch.empty((bsz, cap), device=dev, dtype=torch.int64)
    _decode_select_kernel[(bsz, 2)](
        cand_s, cand_i, segcnt, ends, lens, out_idx, out_score, scores, scr, n_seg, scores.stride(0),
        TOPK=topk, KP=kp, CAP=cap, NSEG=nseg_p, LOG_NSEG=nseg_p.bit_length() - 1, SEG=seg_len,
        num_warps=select_warps,
    )  # fmt: skip
    return out_idx, out_score


def decode_sparse_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    indices: Tensor,
    scale: float,
    chunk: int = 256,
    block_k: int = 64,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor]:
    """Attention of q [B,Hq,D] over its selected cache rows indices [B,topk] (-1 = none) of k_cache, v_cache
    [B,L,Hkv,D], split over `chunk` rows per program and merged (chunk >= topk: one program per KV head, no
    merge): (o [B,Hq,D], lse f32 [B,Hq])."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    topk = indices.shape[1]
    n_split = max(1, triton.cdiv(topk, chunk))
    q = q.contiguous()
    indices = indices.to(torch.int32).contiguous()
    final = n_split == 1
    po = torch.empty((bsz, 1 if final else n_split, hq, d), device=q.device, dtype=torch.float32)
    pml = torch.empty((bsz, 1 if final else n_split, hq, 2), device=q.device, dtype=torch.float32)
    o = torch.empty_like(q)
    lse = torch.empty((bsz, hq), device=q.device, dtype=torch.float32)
    _decode_attn_partial_kernel[(bsz, hkv, n_split)](
        q, k_cache, v_cache, indices, po, pml, o, lse, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), indices.stride(0), o.stride(0), o.stride(1),
        topk, n_split, G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BK=min(block_k, chunk), CHUNK=chunk,
        FINAL=final, num_warps=num_warps,
    )  # fmt: skip
    if final:
        return o, lse
    _decode_attn_merge_kernel[(bsz, hq)](
        po, pml, o, lse, n_split, o.stride(0), o.stride(1), NSP=max(2, triton.next_power_of_2(n_split)), D=d,
        num_warps=4,
    )  # fmt: skip
    return o, lse


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
    chunk: int = 256,
    attn_block: int = 64,
    attn_warps: int = 4,
    **topk_options: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DSA decode step. q [B,Hq,D]; k_cache, v_cache [B,L,Hkv,D]; indexer tensors and `topk_options` (seg_len,
    sample, cap, ...) as `decode_topk`; chunk / attn_block / attn_warps: `decode_sparse_attention`'s rows per
    program, rows per step and warps. Returns (o [B,Hq,D], lse f32 [B,Hq], indices int32 [B,topk] cache rows)."""
    indices, _ = decode_topk(q_idx, k_idx_cache, w, cache_lens, topk, **topk_options)
    o, lse = decode_sparse_attention(
        q, k_cache, v_cache, indices, scale, chunk=chunk, block_k=attn_block, num_warps=attn_warps
    )
    return o, lse, indices


__all__ = ["decode_sparse_attention", "decode_topk", "dsa_decode", "write_fp8_rows"]
