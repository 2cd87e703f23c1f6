"""H200 benchmark of the DSA Triton kernels vs torch SDPA (causal, enable_gqa) on the 30B-A3B attention shape.

Checks every kernel against its torch reference in bf16 first (fails loudly), then times: indexer + top-k, sparse
attention forward / backward, indexer KL (sparse stage), the whole DSA forward and forward+backward, and the decode
step, next to dense SDPA in the same run; ceilings (bf16 matmul, device copy) are measured in the same run.

  python bench/dsa.py --out OUT_DIR [--sizes 32768,65536,131072] [--fwd256] [--decode] [--skip-check]
      [--variants [all]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cuda_timing import graph_replay_ms, median_ms  # noqa: E402  (bench/, the script's folder)

from keye.kernels import dsa_reference as ref  # noqa: E402
from keye.kernels.decode import dsa_decode  # noqa: E402
from keye.kernels.indexer_kl import indexer_kl  # noqa: E402
from keye.kernels.indexer_topk import indexer_topk  # noqa: E402
from keye.kernels.sparse_attention import sparse_attention_bwd, sparse_attention_fwd  # noqa: E402

HQ, HKV, D = 32, 4, 128  # Qwen3-30B-A3B attention
HI, DI, TOPK = 16, 64, 2048  # keye.model.config preset "30b-a3b" DSAConfig
DEV = "cuda"
BF = torch.bfloat16
RESULTS: list[dict] = []


def log(**row: object) -> None:
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def timeit(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of `fn` over `reps` runs, timed with CUDA events after `warmup` runs."""
    return median_ms(fn, reps, warmup)


def ceilings() -> tuple[float, float]:
    """(bf16 matmul TFLOP/s on random 8192^3, device copy GB/s counting read + write)."""
    a = torch.randn(8192, 8192, device=DEV, dtype=BF)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF)
    ms = timeit(lambda: a @ b, reps=20, warmup=5)
    tflops = 2 * 8192**3 / ms / 1e9
    x = torch.randn(1 << 30, device=DEV, dtype=BF)  # 2 GiB
    y = torch.empty_like(x)
    ms_c = timeit(lambda: y.copy_(x), reps=20, warmup=3)
    gbs = 2 * x.numel() * 2 / ms_c / 1e6
    log(kind="ceiling", matmul_tflops=round(tflops, 1), copy_gbs=round(gbs, 1))
    return tflops, gbs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def make(t: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(t, HQ, D, device=DEV, dtype=BF, generator=g)
    k = torch.randn(t, HKV, D, device=DEV, dtype=BF, generator=g)
    v = torch.randn(t, HKV, D, device=DEV, dtype=BF, generator=g)
    qi = torch.randn(t, HI, DI, device=DEV, dtype=BF, generator=g)
    ki = torch.randn(t, DI, device=DEV, dtype=BF, generator=g)
    w = (torch.randn(t, HI, device=DEV, dtype=torch.float32, generator=g) * HI**-0.5).to(BF)
    return q, k, v, qi, ki, w


def check() -> None:
    """bf16 on the GPU vs the torch references (fp32 math on the same bf16 inputs); raises on a miss."""
    t = 6000
    cu = torch.tensor([0, 1777, t], device=DEV, dtype=torch.int32)
    q, k, v, qi, ki, w = make(t, 1)
    scale = D**-0.5
    idx, sc = indexer_topk(qi, ki, w, cu, TOPK)
    ridx, rsc = ref.indexer_topk_reference(qi, ki, w, cu, TOPK)
    same_rows = (idx == ridx).all(1).float().mean().item()
    a = torch.sort(idx.long(), 1).values
    b = torch.sort(ridx.long(), 1).values
    set_overlap = (a == b).float().mean().item()
    fin = torch.isfinite(rsc)
    score_err = rel(sc[fin], rsc[fin])
    log(
        kind="check",
        kernel="indexer_topk",
        rows_identical=same_rows,
        set_overlap=set_overlap,
        score_rel=score_err,
    )
    assert torch.equal(torch.isfinite(sc), fin) and score_err < 1e-5 and set_overlap > 0.99, (
        "indexer_topk mismatch"
    )
    o, lse = sparse_attention_fwd(q, k, v, ridx, scale)
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    ro, rl = ref.sparse_attention_reference(qf, kf, vf, ridx, scale)
    do = torch.randn_like(o)
    rg = torch.autograd.grad(ro, (qf, kf, vf), do.float())
    e_o, e_l = rel(o, ro), rel(lse, rl)
    dq, dk, dv = sparse_attention_bwd(q, k, v, ridx, o, lse, do, scale)
    e_g = [rel(x, y) for x, y in zip((dq, dk, dv), rg, strict=True)]
    dq2, dk2, dv2 = sparse_attention_bwd(q, k, v, ridx, o, lse, do, scale, deterministic=True)
    dq3, dk3, dv3 = sparse_attention_bwd(q, k, v, ridx, o, lse, do, scale, deterministic=True)
    e_det = [rel(x, y) for x, y in zip((dq2, dk2, dv2), rg, strict=True)]
    bitwise = all(torch.equal(x, y) for x, y in zip((dq2, dk2, dv2), (dq3, dk3, dv3), strict=True))
    log(
        kind="check",
        kernel="sparse_attention",
        o_rel=e_o,
        lse_rel=e_l,
        grad_rel=e_g,
        det_grad_rel=e_det,
        det_bitwise=bitwise,
    )
    assert e_o < 2e-2 and e_l < 1e-3 and max(e_g + e_det) < 3e-2 and bitwise, "sparse attention mismatch"
    tk = 2048
    cu2 = torch.tensor([0, 700, tk], device=DEV, dtype=torch.int32)
    q2, k2, _, qi2, ki2, w2 = (x[:tk] for x in (q, k, v, qi, ki, w))
    idx2, _ = ref.indexer_topk_reference(qi2, ki2, w2, cu2, 256)
    for ind in (None, idx2):
        leaves = [x.float().requires_grad_() for x in (qi2, ki2, w2)]
        mine = [x.detach().clone().requires_grad_() for x in (qi2, ki2, w2)]
        rl_ = ref.indexer_kl_reference(q2, k2, cu2, scale, *leaves, ind)
        rg_ = torch.autograd.grad(rl_, leaves)
        ml = indexer_kl(q2, k2, cu2, scale, *mine, ind)
        mg = torch.autograd.grad(ml, mine)
        errs = [rel(x, y) for x, y in zip(mg, rg_, strict=True)]
        log(
            kind="check",
            kernel="indexer_kl",
            sparse=ind is not None,
            loss=float(ml),
            loss_ref=float(rl_),
            grad_rel=errs,
        )
        assert abs(float(ml) - float(rl_)) < 1e-3 * max(1.0, abs(float(rl_))) and max(errs) < 2e-2, (
            "indexer_kl mismatch"
        )
    # decode: cache = the first n rows of one sample; the query is row n-1
    bsz, lmax = 3, 4096
    lens = torch.tensor([4096, 2500, 3001], device=DEV, dtype=torch.int32)
    kc = torch.randn(bsz, lmax, HKV, D, device=DEV, dtype=BF)
    vc = torch.randn_like(kc)
    kic = torch.randn(bsz, lmax, DI, device=DEV, dtype=BF)
    qd = torch.randn(bsz, HQ, D, device=DEV, dtype=BF)
    qid = torch.randn(bsz, HI, DI, device=DEV, dtype=BF)
    wd = torch.randn(bsz, HI, device=DEV, dtype=BF)
    od, _, idd = dsa_decode(qd, kc, vc, qid, kic, wd, lens, TOPK, scale, seg_len=1024 * 2)
    worst = 0.0
    for bi in range(bsz):
        n = int(lens[bi])
        qq = torch.zeros(n, HI, DI, device=DEV, dtype=BF)
        qq[-1] = qid[bi]
        ww = torch.zeros(n, HI, device=DEV, dtype=BF)
        ww[-1] = wd[bi]
        ri, _ = ref.indexer_topk_reference(
            qq[-1:].expand(n, -1, -1),
            kic[bi, :n],
            ww[-1:].expand(n, -1),
            torch.tensor([0, n], device=DEV, dtype=torch.int32),
            TOPK,
            block=n,
        )
        same = (torch.sort(idd[bi].long()).values == torch.sort(ri[-1].long()).values).float().mean().item()
        qa = qd[bi : bi + 1].expand(n, -1, -1).contiguous()
        ro_, _ = ref.sparse_attention_reference(qa[-1:], kc[bi, :n], vc[bi, :n], idd[bi : bi + 1], scale)
        worst = max(worst, rel(od[bi : bi + 1], ro_))
        assert same > 0.99, f"decode selection mismatch {same}"
    log(kind="check", kernel="decode", o_rel=worst)
    assert worst < 2e-2
    # long caches (the threshold path: more than 4 * 2048 rows) against the decode reference
    lens = torch.tensor([65536, 40000, 9000], device=DEV, dtype=torch.int32)
    kc = torch.randn(bsz, 65536, HKV, D, device=DEV, dtype=BF)
    vc = torch.randn_like(kc)
    kic = torch.randn(bsz, 65536, DI, device=DEV, dtype=BF)
    od, ld, idd = dsa_decode(qd, kc, vc, qid, kic, wd, lens, TOPK, scale)
    ro_, rl_, ri_ = ref.dsa_decode_reference(qd, kc, vc, qid, kic, wd, lens, TOPK, scale)
    same = (idd == ri_).all(1).float().mean().item()
    overlap = (idd == ri_).float().mean().item()
    e_o = rel(od, ro_)
    log(
        kind="check",
        kernel="decode_long",
        rows_identical=same,
        slots_equal=overlap,
        o_rel=e_o,
        lse_rel=rel(ld, rl_),
    )
    assert overlap > 0.99 and e_o < 2e-2, "decode (long cache) mismatch"
    torch.cuda.empty_cache()


def dense_sdpa(t: int, backward: bool):
    q = torch.randn(1, HQ, t, D, device=DEV, dtype=BF, requires_grad=backward)
    k = torch.randn(1, HKV, t, D, device=DEV, dtype=BF, requires_grad=backward)
    v = torch.randn(1, HKV, t, D, device=DEV, dtype=BF, requires_grad=backward)
    if not backward:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    do = torch.randn_like(o)
    return lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), do
    )


def bench_len(
    t: int, mm: float, bw: float, reps: int, fwd_only: bool = False, det: bool = False, variants: str = ""
) -> None:
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    q, k, v, qi, ki, w = make(t)
    scale = D**-0.5
    pairs = t * (t + 1) / 2
    idx_flops = pairs * HI * DI * 2
    ms_idx = timeit(lambda: indexer_topk(qi, ki, w, cu, TOPK), reps=reps, warmup=1)
    idx_bytes = t * (HI * DI + DI + HI) * 2 + t * TOPK * 8
    log(kind="time", op="indexer_topk", T=t, ms=ms_idx, tflops=idx_flops / ms_idx / 1e9,
        floor_ms=max(idx_flops / mm / 1e9, idx_bytes / bw / 1e6))  # fmt: skip
    if variants:
        for kw in (dict(select=False), dict(method="slab"), dict(fused_tile=(64, 128, 4)),
                   dict(fused_tile=(64, 64, 4)), dict(sample_stride=32), dict(sample_stride=128)):  # fmt: skip
            ms_v = timeit(lambda kw=kw: indexer_topk(qi, ki, w, cu, TOPK, **kw), reps=reps, warmup=1)
            log(kind="variant", op="indexer_topk", T=t, kw=str(kw), ms=ms_v)
    indices, _ = indexer_topk(qi, ki, w, cu, TOPK)
    n_sel = float((indices >= 0).sum())
    att_flops = n_sel * HQ * 4 * D
    gather_bytes = n_sel * HKV * 2 * D * 2
    min_bytes = 4 * q.numel() + 4 * k.numel() + indices.numel() * 4
    ms_f = timeit(lambda: sparse_attention_fwd(q, k, v, indices, scale), reps=reps)
    log(kind="time", op="sparse_fwd", T=t, ms=ms_f, tflops=att_flops / ms_f / 1e9, gather_gbs=gather_bytes / ms_f / 1e6,
        floor_ms_unique_bytes=max(att_flops / mm / 1e9, min_bytes / bw / 1e6), floor_ms_gather=gather_bytes / bw / 1e6)  # fmt: skip
    if variants == "all":
        for bk, nw in ((128, 8), (32, 4), (64, 8), (128, 4)):
            ms_v = timeit(
                lambda bk=bk, nw=nw: sparse_attention_fwd(q, k, v, indices, scale, bk, nw), reps=reps
            )
            log(kind="variant", op="sparse_fwd", T=t, block_k=bk, num_warps=nw, ms=ms_v)
    ms_dsa_f = ms_idx + ms_f
    ms_sd_f = timeit(dense_sdpa(t, False), reps=max(2, reps // 2), warmup=1)
    dense_flops = pairs * HQ * 4 * D
    log(kind="time", op="sdpa_fwd", T=t, ms=ms_sd_f, tflops=dense_flops / ms_sd_f / 1e9)
    log(
        kind="ratio", op="dsa_fwd/dense_fwd", T=t, dsa_ms=ms_dsa_f, dense_ms=ms_sd_f, ratio=ms_dsa_f / ms_sd_f
    )
    torch.cuda.empty_cache()
    if fwd_only:
        return
    o, lse = sparse_attention_fwd(q, k, v, indices, scale)
    do = torch.randn_like(o)
    ms_b = timeit(lambda: sparse_attention_bwd(q, k, v, indices, o, lse, do, scale), reps=reps)
    if variants == "all":
        for bk, nw in ((32, 4), (128, 8), (64, 8)):
            ms_v = timeit(
                lambda bk=bk, nw=nw: sparse_attention_bwd(
                    q, k, v, indices, o, lse, do, scale, None, False, bk, nw
                ),
                reps=reps,
            )
            log(kind="variant", op="sparse_bwd_atomic", T=t, block_k=bk, num_warps=nw, ms=ms_v)
    log(
        kind="time",
        op="sparse_bwd_atomic",
        T=t,
        ms=ms_b,
        tflops=2.5 * att_flops / ms_b / 1e9,
        gather_gbs=2 * gather_bytes / ms_b / 1e6,
    )
    if variants:
        bench_local_pattern(q, k, v, scale, reps, att_flops)
    if det:
        ms_bd = timeit(
            lambda: sparse_attention_bwd(q, k, v, indices, o, lse, do, scale, deterministic=True),
            reps=2,
            warmup=1,
        )
        log(kind="time", op="sparse_bwd_deterministic", T=t, ms=ms_bd)
    leaves = [x.detach().clone().requires_grad_() for x in (qi, ki, w)]

    def kl_step():
        loss = indexer_kl(q, k, cu, scale, *leaves, indices)
        torch.autograd.grad(loss, leaves)

    ms_kl = timeit(kl_step, reps=max(2, reps // 2), warmup=1)
    log(kind="time", op="indexer_kl_sparse_fwd_bwd", T=t, ms=ms_kl)
    torch.cuda.empty_cache()
    ms_sd_fb = timeit(dense_sdpa(t, True), reps=max(2, reps // 2), warmup=1)
    log(kind="time", op="sdpa_fwd_bwd", T=t, ms=ms_sd_fb, tflops=3.5 * dense_flops / ms_sd_fb / 1e9)
    ms_dsa_fb = ms_idx + ms_f + ms_b
    log(kind="ratio", op="dsa_fwd_bwd/dense_fwd_bwd", T=t, dsa_ms=ms_dsa_fb, dense_ms=ms_sd_fb, ratio=ms_dsa_fb / ms_sd_fb,
        ratio_with_indexer_kl=(ms_dsa_fb + ms_kl) / ms_sd_fb)  # fmt: skip
    torch.cuda.empty_cache()


def bench_indexer_only(sizes: list[int], reps: int) -> None:
    """Indexer top-k alone: the fused path (default and sample strides) vs the slab path, which must agree exactly."""
    for t in sizes:
        cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
        _, _, _, qi, ki, w = make(t)
        a = indexer_topk(qi, ki, w, cu, TOPK)
        b = indexer_topk(qi, ki, w, cu, TOPK, method="slab")
        log(kind="check", kernel="indexer_topk_fused_vs_slab", T=t, identical=bool(torch.equal(a[0], b[0])))
        for kw in ({}, dict(scratch_bytes=4 << 30), dict(fused_tile=(32, 128, 4)), dict(method="slab")):
            ms = timeit(lambda kw=kw, x=(qi, ki, w, cu): indexer_topk(*x, TOPK, **kw), reps=reps, warmup=1)
            log(kind="time", op="indexer_topk", T=t, kw=str(kw), ms=ms)
        torch.cuda.empty_cache()


def local_pattern(
    t: int, window: int = 1024, span: int = 128, block: int = 256, seed: int = 0
) -> torch.Tensor:
    """Selections shaped like a trained indexer's (not random): each token keeps its last `window` keys plus
    (TOPK - window) / span spans of `span` keys retrieved from earlier positions, the spans shared by each query
    block of `block` tokens (tokens of one frame retrieve the same earlier frames). Ascending, -1 padded."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    n_spans = (TOPK - window) // span
    rows = torch.arange(t, device=DEV)
    blk = rows // block
    n_blk = int(blk[-1]) + 1
    # span starts per block, uniformly over the keys before that block's window
    u = torch.rand(n_blk, n_spans, device=DEV, generator=g)
    limit = (torch.arange(n_blk, device=DEV) * block - window - span).clamp(min=0).float()
    starts = (u * limit[:, None]).long()[blk]  # [t, n_spans]
    spans = (starts[:, :, None] + torch.arange(span, device=DEV)).reshape(t, -1)
    recent = rows[:, None] - torch.arange(window, device=DEV).flip(0)[None, :]
    idx = torch.cat([spans, recent], 1)
    idx = torch.where((idx >= 0) & (idx <= rows[:, None]), idx, -1)
    idx = torch.sort(idx, 1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]  # a span overlapping the recent window
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where((idx < 0) | dup, big, idx), 1).values  # unique keys ascending, then padding
    return torch.where(idx == big, -1, idx).to(torch.int32).contiguous()


def bench_local_pattern(q, k, v, scale: float, reps: int, att_flops_random: float) -> None:
    """Sparse attention forward / backward on `local_pattern` selections (the gathers then hit L2)."""
    t = q.shape[0]
    ind = local_pattern(t)
    n_sel = float((ind >= 0).sum())
    ms_f = timeit(lambda: sparse_attention_fwd(q, k, v, ind, scale), reps=reps)
    o, lse = sparse_attention_fwd(q, k, v, ind, scale)
    do = torch.randn_like(o)
    ms_b = timeit(lambda: sparse_attention_bwd(q, k, v, ind, o, lse, do, scale), reps=reps)
    log(kind="time", op="sparse_fwd_bwd_local_pattern", T=t, selected_per_row=n_sel / t, fwd_ms=ms_f, bwd_ms=ms_b,
        fwd_tflops=n_sel * HQ * 4 * D / ms_f / 1e9)  # fmt: skip


def threshold_miss_rate(kic: torch.Tensor, n: int, draws: int = 512) -> None:
    """How often decode's sampled threshold misses (fewer than k or more than cap rows at or above it, so the slow
    exact fallback runs), for random indexer queries against one cache: the kernels' rule replayed in torch."""
    g = torch.Generator(device=DEV).manual_seed(1)
    for samp, cap in ((1024, 4 * TOPK), (2048, 4 * TOPK), (4096, 2 * TOPK), (8192, 2 * TOPK)):
        target = (TOPK * cap) ** 0.5
        rank = min(int(target * samp / n) + 1, samp)
        rows = (torch.arange(samp, device=DEV) * n) // samp
        misses, counts = 0, []
        for _ in range(draws // 64):
            qi = torch.randn(64, HI, DI, device=DEV, generator=g).to(BF).float()
            w = torch.randn(64, HI, device=DEV, generator=g).to(BF).float()
            sc = torch.einsum("bhd,nd->bhn", qi, kic[:n].float()).mul(DI**-0.5).relu()
            sc = torch.einsum("bh,bhn->bn", w, sc)
            tau = torch.topk(sc[:, rows], rank, dim=1).values[:, -1:]
            cnt = (sc >= tau).sum(1)
            misses += int(((cnt < TOPK) | (cnt > cap)).sum())
            counts.append(cnt.float())
        c = torch.cat(counts)
        log(kind="decode_threshold", sample=samp, cap=cap, target=round(target), draws=draws, misses=misses,
            count_mean=round(float(c.mean()), 1), count_min=int(c.min()), count_max=int(c.max()))  # fmt: skip


def bench_decode(lcache: int, bsz: int, bw: float) -> None:
    scale = D**-0.5
    kc = torch.randn(bsz, lcache, HKV, D, device=DEV, dtype=BF)
    vc = torch.randn_like(kc)
    kic = torch.randn(bsz, lcache, DI, device=DEV, dtype=BF)
    q = torch.randn(bsz, HQ, D, device=DEV, dtype=BF)
    qi = torch.randn(bsz, HI, DI, device=DEV, dtype=BF)
    w = torch.randn(bsz, HI, device=DEV, dtype=BF)
    lens = torch.full((bsz,), lcache, device=DEV, dtype=torch.int32)
    for seg in (1024, 4096):
        ms_v = timeit(
            lambda seg=seg: dsa_decode(q, kc, vc, qi, kic, w, lens, TOPK, scale, seg_len=seg),
            reps=50,
            warmup=5,
        )
        log(kind="variant", op="decode", B=bsz, seg_len=seg, ms=ms_v)
    ms = timeit(lambda: dsa_decode(q, kc, vc, qi, kic, w, lens, TOPK, scale), reps=50, warmup=5)
    min_bytes = bsz * (lcache * DI * 2 + TOPK * HKV * 2 * D * 2)
    qd = q[:, :, None, :]
    kd = kc.permute(0, 2, 1, 3).contiguous()
    vd = vc.permute(0, 2, 1, 3).contiguous()
    ms_d = timeit(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), reps=50, warmup=5)
    dense_bytes = bsz * lcache * HKV * 2 * D * 2
    log(kind="time", op="decode", B=bsz, L=lcache, dsa_ms=ms, dense_ms=ms_d, ratio=ms / ms_d, dsa_gbs_min=min_bytes / ms / 1e6,
        dsa_floor_ms=min_bytes / bw / 1e6, dense_gbs=dense_bytes / ms_d / 1e6, dense_floor_ms=dense_bytes / bw / 1e6)  # fmt: skip
    for chunk, blk, warps in ((256, 64, 4), (2048, 64, 4), (2048, 64, 8), (2048, 128, 8), (1024, 64, 4),
                              (512, 64, 4)):  # fmt: skip
        ms_g = graph_replay_ms(
            lambda chunk=chunk, blk=blk, warps=warps: dsa_decode(
                q, kc, vc, qi, kic, w, lens, TOPK, scale, chunk=chunk, attn_block=blk, attn_warps=warps
            )
        )
        log(kind="variant", op="decode_graph", B=bsz, chunk=chunk, attn_block=blk, attn_warps=warps, ms=ms_g)
    if bsz == 8:
        threshold_miss_rate(kic[0], lcache)
    ms_g = graph_replay_ms(lambda: dsa_decode(q, kc, vc, qi, kic, w, lens, TOPK, scale))
    ms_dg = graph_replay_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
    log(kind="time", op="decode_cuda_graph", B=bsz, L=lcache, dsa_ms=ms_g, dense_ms=ms_dg, ratio=ms_g / ms_dg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sizes", default="32768,65536,131072")
    ap.add_argument("--fwd256", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument(
        "--indexer-only", action="store_true", help="time only the indexer top-k paths at --sizes"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="?", const="select", default="",
                    help="at 128K also time indexer/selection variants (`all`: sparse attention tiles too)")  # fmt: skip
    args = ap.parse_args()
    t0 = time.time()
    log(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))  # fmt: skip
    if args.indexer_only:
        bench_indexer_only([int(x) for x in args.sizes.split(",") if x], args.reps)
        return
    mm, bw = ceilings()
    if not args.skip_check:
        check()
        log(kind="check", ok=True, s=round(time.time() - t0, 1))
    for t in [int(s) for s in args.sizes.split(",") if s]:
        bench_len(t, mm, bw, args.reps, det=t <= 32768, variants=args.variants if t == 131072 else "")
        log(kind="progress", T=t, s=round(time.time() - t0, 1))
    if args.fwd256:
        bench_len(262144, mm, bw, 2, fwd_only=True)
    if args.decode:
        for bsz in (1, 8):
            bench_decode(131072, bsz, bw)
    with open(os.path.join(args.out, "dsa.jsonl"), "w") as f:
        for row in RESULTS:
            f.write(json.dumps(row) + "\n")
    print(f"total {time.time() - t0:.1f}s; {math.nan if not RESULTS else len(RESULTS)} rows")


if __name__ == "__main__":
    main()
