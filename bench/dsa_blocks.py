# ruff: noqa: B023  (the timing lambdas run at once, inside their loop iteration)
"""H200 benchmark of DSA by selection shape (issue 20): per-token sparse attention vs the block-union path per
adjacent-overlap level, the block-shared selection mode, the FP8 indexer (top-k recall vs bf16) and the FP8 indexer
key cache in decode, each beside dense SDPA (causal, enable_gqa) in the same run, with the ceilings and the gather
floor measured in the same run. Checks every new kernel against its reference in bf16 first.

  python bench/dsa_blocks.py --out OUT_DIR [--sizes 131072] [--fwd256] [--decode] [--skip-check]

Shape of bench/dsa.py: 32 query heads, 4 KV heads, head dim 128; indexer H_I=16, D_I=64; top-k 2048. Selections
for the attention timings come from keye.kernels.selections.synthetic_selections (overlap 0 = random; otherwise a
local window of k/8 keys + 16 sink keys + far keys that persist between neighbours), measured by selection_stats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dsa as base  # noqa: E402

from keye.kernels import dsa_reference as ref  # noqa: E402
from keye.kernels.block_selection import (  # noqa: E402
    block_layout,
    block_sparse_attention_reference,
    block_topk,
    expand_block_indices,
    union_of_selections,
)
from keye.kernels.block_sparse_attention import block_sparse_attention_bwd, block_sparse_attention_fwd  # noqa: E402
from keye.kernels.block_topk import block_topk_triton  # noqa: E402
from keye.kernels.decode import decode_topk, dsa_decode  # noqa: E402
from keye.kernels.indexer_fp8 import (  # noqa: E402
    dequantize,
    indexer_topk_fp8,
    quantize_indexer_keys,
    quantize_indexer_query,
    quantize_rows,
    topk_recall,
)
from keye.kernels.indexer_topk import indexer_topk  # noqa: E402
from keye.kernels.selections import selection_stats, synthetic_selections  # noqa: E402
from keye.kernels.sparse_attention import sparse_attention_bwd, sparse_attention_fwd  # noqa: E402

HQ, HKV, D, HI, DI, TOPK = base.HQ, base.HKV, base.D, base.HI, base.DI, base.TOPK
DEV, BF = base.DEV, base.BF
OUT: list[str] = []


def log(**row: object) -> None:
    base.log(**row)
    if OUT:
        with open(OUT[0], "w") as f:
            json.dump(base.RESULTS, f, indent=1)


def guarded(name: str, fn, *args, **kw) -> None:
    """Run one section; an exception is logged and the run goes on (so one failure keeps the other figures)."""
    try:
        fn(*args, **kw)
    except Exception as e:  # noqa: BLE001
        log(kind="error", section=name, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-1500:])
    torch.cuda.empty_cache()


def selections(cu: torch.Tensor, overlap: float, topk: int = TOPK, seed: int = 0) -> torch.Tensor:
    local = 0.125 if overlap > 0 else 0.0
    return synthetic_selections(
        cu, topk, overlap, local_share=local, sink=16 if overlap > 0 else 0, seed=seed
    )


# ------------------------------------------------------------------------------------------------------ checks
def check() -> None:
    """bf16 kernels vs the torch references on the same values (fp32 math), packed [1777, 4223]."""
    t, topk = 6000, 256
    cu = torch.tensor([0, 1777, t], device=DEV, dtype=torch.int32)
    q, k, v, qi, ki, w = base.make(t, seed=3)
    scale = D**-0.5
    do = torch.randn_like(q)
    # block-shared: the Triton selection vs the torch spec on the same bf16 values
    bidx, bstart = block_topk_triton(qi, ki, w, cu, topk, 64)
    bidx_ref, _ = block_topk(qi, ki, w, cu, topk, 64)
    same = float((bidx == bidx_ref).all(1).float().mean())
    log(kind="check", kernel="block_topk_triton", rows_identical=same, recall=topk_recall(bidx, bidx_ref))
    cases = {"block_shared": (bidx, bstart, None)}
    tok = selections(cu, 0.8, topk, seed=1)
    bs16 = block_layout(cu, 16)
    uidx, bits = union_of_selections(tok, bs16)
    cases["union_overlap0.8"] = (uidx, bs16, bits)
    for name, (bi, bst, bb) in cases.items():
        o, lse = block_sparse_attention_fwd(q, k, v, bi, bst, scale, bb)
        leaves = [x.float().requires_grad_() for x in (q, k, v)]
        ro, rl = block_sparse_attention_reference(*leaves, bi, bst, scale, bb)
        want = torch.autograd.grad(ro, leaves, do.float())
        got = block_sparse_attention_bwd(q, k, v, bi, bst, o, lse, do, scale, bb)
        errs = {n: base.rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, want, strict=True)}
        ok = base.rel(o, ro) < 1e-2 and max(errs.values()) < 2e-2
        finite = torch.isfinite(rl)
        lse_err = float((lse[finite] - rl.detach()[finite]).abs().max())
        log(kind="check", kernel=f"block_sparse_{name}", o_rel=base.rel(o, ro), lse_abs=lse_err, **errs,
            block_topk_triton_vs_spec_rows_identical=same if name == "block_shared" else None, ok=ok)  # fmt: skip
        assert ok, name
    # FP8 indexer: the kernel vs the reference on the dequantised values; recall vs the bf16 scores
    q8, wq = quantize_indexer_query(qi, w)
    k8, sk = quantize_indexer_keys(ki)
    _, sq = quantize_rows(qi)
    got, got_s = indexer_topk(q8, k8, wq, cu, topk, k_scale=sk)
    want, want_s = ref.indexer_topk_reference(dequantize(q8, sq), dequantize(k8, sk), w.float(), cu, topk)
    rows_same = float((got == want).all(1).float().mean())
    bf_idx, _ = ref.indexer_topk_reference(qi, ki, w, cu, topk)
    fin = torch.isfinite(want_s)
    log(kind="check", kernel="indexer_topk_fp8", rows_identical_vs_dequant_ref=rows_same,
        recall_vs_dequant_ref=topk_recall(got, want), score_rel=base.rel(got_s[fin], want_s[fin]),
        recall_vs_bf16=topk_recall(got, bf_idx), ok=topk_recall(got, want) > 0.999)  # fmt: skip
    # FP8 decode key cache
    b, lmax = 3, 9000
    lens = torch.tensor([9000, 4001, 300], device=DEV, dtype=torch.int32)
    qd = torch.randn(b, HI, DI, device=DEV, dtype=BF)
    kc = torch.randn(b, lmax, DI, device=DEV, dtype=BF)
    wd = torch.randn(b, HI, device=DEV, dtype=BF)
    qd8, wdq = quantize_indexer_query(qd, wd)
    kc8, skc = quantize_indexer_keys(kc)
    _, sqd = quantize_rows(qd)
    gi, _ = decode_topk(qd8, kc8, wdq, lens, topk, k_scale=skc)
    scores = ref.decode_index_scores(dequantize(qd8, sqd), dequantize(kc8, skc), wd.float(), lens)
    _, wi = ref.topk_lowest_index_ties(scores, topk)
    wi = torch.where(torch.arange(topk, device=DEV)[None, :] < lens[:, None].clamp(max=topk), wi, -1)
    bf_i, _ = decode_topk(qd, kc, wd, lens, topk)
    log(kind="check", kernel="decode_topk_fp8_cache", recall_vs_dequant_ref=topk_recall(gi, wi),
        recall_vs_bf16_kernel=topk_recall(gi, bf_i))  # fmt: skip


# ------------------------------------------------------------------------------------------------------ timings
def gather_floor(t: int, bw: float) -> None:
    """Bytes the per-token forward gathers (K+V rows of 256 B per KV head per selected key) at the copy rate, and
    a torch gather of the same random 256-byte rows (1/16 of them) timed."""
    rows = torch.randn(t * HKV, D, device=DEV, dtype=BF)
    n = t * TOPK * HKV // 16
    idx = torch.randint(0, t * HKV, (n,), device=DEV)
    ms = base.timeit(lambda: rows.index_select(0, idx), reps=5, warmup=1) * 16 * 2  # K and V
    gathered = t * TOPK * HKV * 2 * D * 2
    log(kind="floor", op="sparse_fwd_gather", T=t, gathered_gb=gathered / 1e9, floor_ms_at_copy_rate=gathered / bw / 1e6,
        index_select_ms=ms, index_select_read_gbs=gathered / ms / 1e6)  # fmt: skip


def bench_indexer(t: int) -> None:
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    _, _, _, qi, ki, w = base.make(t, seed=1)
    ms_bf = base.timeit(lambda: indexer_topk(qi, ki, w, cu, TOPK), reps=3, warmup=1)
    ms_fp8 = base.timeit(lambda: indexer_topk_fp8(qi, ki, w, cu, TOPK), reps=3, warmup=1)
    q8, wq = quantize_indexer_query(qi, w)
    k8, sk = quantize_indexer_keys(ki)
    ms_fp8_k = base.timeit(lambda: indexer_topk(q8, k8, wq, cu, TOPK, k_scale=sk), reps=3, warmup=1)
    a, _ = indexer_topk(qi, ki, w, cu, TOPK)
    b, _ = indexer_topk(q8, k8, wq, cu, TOPK, k_scale=sk)
    rows = torch.arange(TOPK, t, max(1, t // 2048), device=DEV)
    log(kind="time", op="indexer_topk", T=t, bf16_ms=ms_bf, fp8_ms_with_quant=ms_fp8, fp8_ms_kernels=ms_fp8_k,
        fp8_recall_vs_bf16=topk_recall(b[rows], a[rows]))  # fmt: skip
    for blk in (64, 128):
        ms_b = base.timeit(lambda blk=blk: block_topk(qi, ki, w, cu, TOPK, blk), reps=3, warmup=1)
        log(kind="time", op="block_topk", T=t, block=blk, ms=ms_b)
    st = selection_stats(a, cu)
    log(kind="selection_stats", source="random-input indexer (untrained)", T=t, **st)


def bench_overlap(t: int, sdpa_fwd: float, sdpa_fb: float, levels: list[float]) -> None:
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    q, k, v, _, _, _ = base.make(t, seed=2)
    scale = D**-0.5
    do = torch.randn_like(q)
    for ov in levels:
        idx = selections(cu, ov)
        st = selection_stats(idx, cu)
        log(kind="selection_stats", source=f"synthetic overlap={ov}", T=t, **st)
        o, lse = sparse_attention_fwd(q, k, v, idx, scale)
        f_tok = base.timeit(lambda idx=idx: sparse_attention_fwd(q, k, v, idx, scale), reps=3, warmup=1)
        b_tok = base.timeit(
            lambda idx=idx, o=o, lse=lse: sparse_attention_bwd(q, k, v, idx, o, lse, do, scale),
            reps=3,
            warmup=1,
        )
        log(kind="time", op="token_sparse", T=t, overlap=ov, jaccard=st["jaccard"], fwd_ms=f_tok, bwd_ms=b_tok,
            fwd_vs_sdpa=f_tok / sdpa_fwd, fb_vs_sdpa=(f_tok + b_tok) / sdpa_fb)  # fmt: skip
        for ub in (16, 32) if ov > 0 else (16,):
            bst = block_layout(cu, ub)
            ms_u = base.timeit(lambda bst=bst, idx=idx: union_of_selections(idx, bst), reps=3, warmup=1)
            uidx, bits = union_of_selections(idx, bst)
            u_mean = float((uidx >= 0).sum(1).float().mean())
            f_u = base.timeit(
                lambda: block_sparse_attention_fwd(q, k, v, uidx, bst, scale, bits), reps=3, warmup=1
            )
            row = dict(T=t, overlap=ov, union_block=ub, union_mean=u_mean, union_max=uidx.shape[1], union_build_ms=ms_u,
                       fwd_ms=f_u, fwd_vs_token=f_u / f_tok)  # fmt: skip
            if ov > 0:
                ou, lu = block_sparse_attention_fwd(q, k, v, uidx, bst, scale, bits)
                b_u = base.timeit(
                    lambda ou=ou, lu=lu: block_sparse_attention_bwd(
                        q, k, v, uidx, bst, ou, lu, do, scale, bits
                    ),
                    reps=3,
                    warmup=1,
                )
                row.update(bwd_ms=b_u, fwd_vs_sdpa=(f_u + ms_u) / sdpa_fwd, fb_vs_sdpa=(f_u + b_u + ms_u) / sdpa_fb,
                           o_rel_vs_token=base.rel(ou, o))  # fmt: skip
            log(kind="time", op="union_sparse", **row)
            torch.cuda.empty_cache()
        del idx, o, lse
        torch.cuda.empty_cache()


def bench_block_shared(t: int, sdpa_fwd: float, sdpa_fb: float | None) -> None:
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    q, k, v, qi, ki, w = base.make(t, seed=4)
    scale = D**-0.5
    for blk in (64, 128):
        ms_torch = base.timeit(lambda blk=blk: block_topk(qi, ki, w, cu, TOPK, blk), reps=2, warmup=1)
        ms_sel = base.timeit(lambda blk=blk: block_topk_triton(qi, ki, w, cu, TOPK, blk), reps=3, warmup=1)
        bidx, bstart = block_topk_triton(qi, ki, w, cu, TOPK, blk)
        ref_idx, _ = block_topk(qi, ki, w, cu, TOPK, blk)
        log(kind="time", op="block_topk", T=t, block=blk, triton_ms=ms_sel, torch_ms=ms_torch,
            rows_identical=float((bidx == ref_idx).all(1).float().mean()))  # fmt: skip
        del ref_idx
        tok = expand_block_indices(bidx, bstart, t)
        log(kind="selection_stats", source=f"block-shared block={blk}", T=t, **selection_stats(tok, cu))
        del tok
        for bq, bk, warps in ((16, 32, 4), (32, 32, 8), (16, 32, 8), (32, 64, 8)):
            f = base.timeit(lambda bq=bq, bk=bk, warps=warps: block_sparse_attention_fwd(
                q, k, v, bidx, bstart, scale, block_q=bq, block_k=bk, num_warps=warps), reps=3, warmup=1)  # fmt: skip
            log(
                kind="variant",
                op="block_shared_fwd",
                T=t,
                block=blk,
                block_q=bq,
                block_k=bk,
                warps=warps,
                ms=f,
            )
        f = base.timeit(lambda: block_sparse_attention_fwd(q, k, v, bidx, bstart, scale), reps=3, warmup=1)
        flops = 4 * t * TOPK * HQ * D  # upper bound (each token its whole block list)
        row = dict(T=t, block=blk, select_ms=ms_sel, fwd_ms=f, fwd_tflops=flops / f / 1e9,
                   total_fwd_vs_sdpa=(ms_sel + f) / sdpa_fwd)  # fmt: skip
        if sdpa_fb is not None:
            o, lse = block_sparse_attention_fwd(q, k, v, bidx, bstart, scale)
            do = torch.randn_like(q)
            for bq, bk, warps in ((16, 64, 8), (16, 32, 8), (8, 128, 8)):
                b_ = base.timeit(lambda bq=bq, bk=bk, warps=warps: block_sparse_attention_bwd(
                    q, k, v, bidx, bstart, o, lse, do, scale, block_q=bq, block_k=bk, num_warps=warps), reps=3, warmup=1)  # fmt: skip
                log(
                    kind="variant",
                    op="block_shared_bwd",
                    T=t,
                    block=blk,
                    block_q=bq,
                    block_k=bk,
                    warps=warps,
                    ms=b_,
                )
            b_ = base.timeit(
                lambda: block_sparse_attention_bwd(q, k, v, bidx, bstart, o, lse, do, scale), reps=3, warmup=1
            )
            row.update(bwd_ms=b_, total_fb_vs_sdpa=(ms_sel + f + b_) / sdpa_fb)
        log(kind="time", op="block_shared", **row)


def bench_decode_fp8(lcache: int, bsz: int) -> None:
    scale = D**-0.5
    kc = torch.randn(bsz, lcache, HKV, D, device=DEV, dtype=BF)
    vc = torch.randn_like(kc)
    kic = torch.randn(bsz, lcache, DI, device=DEV, dtype=BF)
    q = torch.randn(bsz, HQ, D, device=DEV, dtype=BF)
    qi = torch.randn(bsz, HI, DI, device=DEV, dtype=BF)
    w = torch.randn(bsz, HI, device=DEV, dtype=BF)
    lens = torch.full((bsz,), lcache, device=DEV, dtype=torch.int32)
    kic8, ks = quantize_indexer_keys(kic)
    qi8, wq = quantize_indexer_query(qi, w)
    qd = q[:, :, None, :]
    kd = kc.permute(0, 2, 1, 3).contiguous()
    vd = vc.permute(0, 2, 1, 3).contiguous()
    ms_bf = base.graph_replay_ms(lambda: dsa_decode(q, kc, vc, qi, kic, w, lens, TOPK, scale))
    ms_8 = base.graph_replay_ms(lambda: dsa_decode(q, kc, vc, qi8, kic8, wq, lens, TOPK, scale, k_scale=ks))
    ms_d = base.graph_replay_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
    a, _ = decode_topk(qi, kic, w, lens, TOPK)
    b, _ = decode_topk(qi8, kic8, wq, lens, TOPK, k_scale=ks)
    log(kind="time", op="decode_cuda_graph", B=bsz, L=lcache, dsa_bf16_ms=ms_bf, dsa_fp8_cache_ms=ms_8, dense_ms=ms_d,
        ratio_bf16=ms_bf / ms_d, ratio_fp8=ms_8 / ms_d, fp8_recall_vs_bf16=topk_recall(b, a),
        idx_cache_bytes_bf16=kic.numel() * 2, idx_cache_bytes_fp8=kic8.numel() + ks.numel() * 4)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sizes", default="131072")
    ap.add_argument("--levels", default="0,0.5,0.8,0.95")
    ap.add_argument("--fwd256", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--only", default="", help="comma list of sections: indexer,overlap,block,decode,floor")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    OUT.append(os.path.join(args.out, "dsa_blocks.json"))
    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731
    log(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__)
    mm, bw = base.ceilings()
    if not args.skip_check:
        guarded("check", check)
    for t in [int(x) for x in args.sizes.split(",") if x]:
        sdpa_fwd = base.timeit(base.dense_sdpa(t, False), reps=3, warmup=1)
        sdpa_fb = base.timeit(base.dense_sdpa(t, True), reps=3, warmup=1)
        log(kind="time", op="sdpa", T=t, fwd_ms=sdpa_fwd, fwd_bwd_ms=sdpa_fb)
        torch.cuda.empty_cache()
        if want("floor"):
            guarded("floor", gather_floor, t, bw)
        if want("indexer"):
            guarded("indexer", bench_indexer, t)
        if want("block"):
            guarded("block", bench_block_shared, t, sdpa_fwd, sdpa_fb)
        if want("overlap"):
            guarded(
                "overlap", bench_overlap, t, sdpa_fwd, sdpa_fb, [float(x) for x in args.levels.split(",")]
            )
    if args.fwd256:
        t = 262144
        sdpa_fwd = base.timeit(base.dense_sdpa(t, False), reps=2, warmup=1)
        log(kind="time", op="sdpa", T=t, fwd_ms=sdpa_fwd)
        guarded("block256", bench_block_shared, t, sdpa_fwd, None)
    if args.decode:
        guarded("decode", bench_decode_fp8, 131072, 8)


if __name__ == "__main__":
    main()
