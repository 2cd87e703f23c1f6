"""Where the per-token indexer + top-k spends its time at 128K, and which layout of the fused score + compact kernel
is fastest (bf16 and FP8). The library's fused path (keye/kernels/indexer_topk.py) runs: strided sample scores ->
per-row threshold -> score + compact (the scores recomputed tile by tile, keys at or above the threshold kept) ->
exact select among the candidates. This script times each link on the same inputs, and variants of the score +
compact kernel written here (a superset of the library's `_scores_compact_kernel`):

  MODE 0 full (scores + compaction), 1 scores only (a row max is stored so nothing is dead code), 2 the dots only
  (no relu / weights: sum of raw dots), UNROLL heads unrolled (static_range) instead of a runtime loop, FOLD the
  1/sqrt(D_I) scale folded into the head weights (relu commutes with a positive scale: one multiply less per head
  and pair), tile (rows BM, keys BN, warps, pipeline stages).

Every full variant must reproduce the library's candidate lists exactly (same counts, same candidate indices; FOLD
may move scores by an ulp, so it is checked on the selected top-k instead).

  python bench/dsa_indexer_profile.py --out OUT_DIR [--t 131072] [--dtypes fp8,bf16] [--quick]
      # --set2: tiles without unrolled heads, "k2" (scale folded into the weights, int32 slot offsets, as the
      # library now does), "pack" (one int64 store per candidate); --set3: baseline, k2, k2 + pack with both selects
  TRITON_INTERPRET=1 python bench/dsa_indexer_profile.py --out OUT_DIR --cpu-smoke   # checks only, T=300
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cuda_timing import median_ms  # noqa: E402  (bench/, the script's folder)

from keye.kernels import indexer_topk as it  # noqa: E402
from keye.kernels.indexer_fp8 import quantize_indexer_keys, quantize_indexer_query, topk_recall  # noqa: E402

HI, DI, TOPK = 16, 64, 2048
DEV, BF = "cuda", torch.bfloat16
ROWS: list[dict] = []


def log(out: str, **row: object) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "dsa_indexer_profile.json"), "w") as f:
        json.dump(ROWS, f, indent=1)


def timeit(fn, reps: int = 3, warmup: int = 1) -> float:
    if DEV == "cpu":  # interpreter smoke run: no timing value
        fn()
        return 0.0
    return round(median_ms(fn, reps, warmup), 3)


@triton.jit
def _variant_kernel(
    QI, KI, W, ROW_START, TAU, SCR_S, SCR_I, CNT, KS,
    row0, n_rows, n_keys, scale,
    stride_qt, stride_qh, stride_kt, stride_wt,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr,
    HAS_KS: tl.constexpr, MODE: tl.constexpr, UNROLL: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    r_loc = pid * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    tau = tl.load(TAU + rows, mask=rmask, other=float("inf"))
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid * BM + BM, n_rows) - 1
    offs_d = tl.arange(0, DI)
    off = r_loc[:, None].to(tl.int64) * CAP
    cnt = tl.zeros([BM], tl.int32)
    best = tl.full([BM], float("-inf"), tl.float32)
    for c0 in range(lo, hi + 1, BN):
        cols = c0 + tl.arange(0, BN)
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=(cols < n_keys)[None, :],
            other=0.0,
        )
        acc = tl.zeros([BM, BN], tl.float32)
        if UNROLL:
            for j in tl.static_range(H):
                qj = tl.load(QI + rows[:, None] * stride_qt + j * stride_qh + offs_d[None, :], mask=rmask[:, None],
                             other=0.0)  # fmt: skip
                wj = tl.load(W + rows * stride_wt + j, mask=rmask, other=0.0).to(tl.float32)
                if MODE == 2:
                    acc += tl.dot(qj, kt)
                elif FOLD:
                    acc += wj[:, None] * tl.maximum(tl.dot(qj, kt), 0.0)
                else:
                    acc += wj[:, None] * tl.maximum(tl.dot(qj, kt) * scale, 0.0)
        else:
            for j in range(H):
                qj = tl.load(QI + rows[:, None] * stride_qt + j * stride_qh + offs_d[None, :], mask=rmask[:, None],
                             other=0.0)  # fmt: skip
                wj = tl.load(W + rows * stride_wt + j, mask=rmask, other=0.0).to(tl.float32)
                if MODE == 2:
                    acc += tl.dot(qj, kt)
                elif FOLD:
                    acc += wj[:, None] * tl.maximum(tl.dot(qj, kt), 0.0)
                else:
                    acc += wj[:, None] * tl.maximum(tl.dot(qj, kt) * scale, 0.0)
        if HAS_KS:
            acc = acc * tl.load(KS + cols, mask=cols < n_keys, other=0.0)[None, :]
        inwin = rmask[:, None] & (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])
        if MODE == 0:
            take = inwin & (acc >= tau[:, None])
            take_i = take.to(tl.int32)
            pos = cnt[:, None] + tl.cumsum(take_i, 1) - 1
            keep = take & (pos < CAP)
            tl.store(SCR_S + off + pos, acc, mask=keep)
            tl.store(SCR_I + off + pos, (cols[None, :] + tl.zeros([BM, BN], tl.int32)), mask=keep)
            cnt += tl.sum(take_i, 1)
        else:
            best = tl.maximum(best, tl.max(tl.where(inwin, acc, float("-inf")), 1))
    if MODE == 0:
        tl.store(CNT + r_loc, cnt, mask=rmask)
    else:
        tl.store(CNT + r_loc, best.to(tl.int32, bitcast=True), mask=rmask)


@triton.jit
def _compact2_kernel(
    QI, KI, W, ROW_START, TAU, SCR_S, SCR_I, SCR_P, CNT, KS,
    row0, n_rows, n_keys, scale,
    stride_qt, stride_qh, stride_kt, stride_wt,
    H: tl.constexpr, DI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr,
    HAS_KS: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """The library kernel with row-base pointers + int32 slot offsets (fewer 64-bit address ops per pair), the
    scale folded into W, and PACK: one int64 store per candidate (fp32 score bits << 32 | key index)."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    r_loc = pid * BM + tl.arange(0, BM)
    rmask = r_loc < n_rows
    rows = (row0 + r_loc).to(tl.int64)
    starts = tl.load(ROW_START + rows, mask=rmask, other=2147483647)
    tau = tl.load(TAU + rows, mask=rmask, other=float("inf"))
    lo = tl.min(starts)
    hi = row0 + tl.minimum(pid * BM + BM, n_rows) - 1
    offs_d = tl.arange(0, DI)
    row_off = r_loc.to(tl.int64) * CAP
    ps = SCR_S + row_off
    pi = SCR_I + row_off
    pp = SCR_P + row_off
    cnt = tl.zeros([BM], tl.int32)
    for c0 in range(lo, hi + 1, BN):
        cols = c0 + tl.arange(0, BN)
        kt = tl.load(
            KI + cols[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=(cols < n_keys)[None, :],
            other=0.0,
        )
        acc = tl.zeros([BM, BN], tl.float32)
        for j in range(H):
            qj = tl.load(QI + rows[:, None] * stride_qt + j * stride_qh + offs_d[None, :], mask=rmask[:, None],
                         other=0.0)  # fmt: skip
            wj = tl.load(W + rows * stride_wt + j, mask=rmask, other=0.0).to(tl.float32)
            acc += wj[:, None] * tl.maximum(tl.dot(qj, kt), 0.0)
        if HAS_KS:
            acc = acc * tl.load(KS + cols, mask=cols < n_keys, other=0.0)[None, :]
        inwin = (cols[None, :] >= starts[:, None]) & (cols[None, :] <= rows[:, None])
        take = inwin & (acc >= tau[:, None])
        take_i = take.to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(take_i, 1) - 1
        keep = take & (pos < CAP)
        if PACK:
            comp = (acc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :].to(tl.int64)
            tl.store(pp[:, None] + pos, comp, mask=keep)
        else:
            tl.store(ps[:, None] + pos, acc, mask=keep)
            tl.store(pi[:, None] + pos, cols[None, :] + tl.zeros([BM, BN], tl.int32), mask=keep)
        cnt += tl.sum(take_i, 1)
    tl.store(CNT + r_loc, cnt, mask=rmask)


@triton.jit
def _select_packed_kernel(
    SCR_P, CNT, ROW_START, OUT_IDX, OUT_SCORE, MISS, row0,
    TOPK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, VIEW32: tl.constexpr = False,
):  # fmt: skip
    r = tl.program_id(0)
    t = row0 + r
    a = tl.load(ROW_START + t)
    need = tl.minimum(t - a + 1, TOPK)
    cnt = tl.load(CNT + r)
    if (cnt >= need) and (cnt <= CAP):
        slots = tl.arange(0, CAP)
        valid = slots < cnt
        if VIEW32:  # the int64 slots read as two int32 words (little endian: index, then score bits)
            base = SCR_P + r.to(tl.int64) * (2 * CAP) + 2 * slots
            gidx = tl.load(base, mask=valid, other=0)
            score = tl.load(base + 1, mask=valid, other=0).to(tl.float32, bitcast=True)
        else:
            comp = tl.load(SCR_P + r.to(tl.int64) * CAP + slots, mask=valid, other=0)
            score = (comp >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            gidx = (comp & 4294967295).to(tl.int32)
        keys = it._order_key(tl.where(valid, score, float("-inf")))
        it._emit_selected(keys, gidx, valid, need, OUT_IDX, OUT_SCORE, t.to(tl.int64), TOPK, KP)
    else:
        tl.store(MISS + r, 1)


def prepare(qi, ki, w, cu, k_scale, cap: int):
    """The library's sample + threshold for every row (one chunk), as `_fused_rows` computes them; timed."""
    t = qi.shape[0]
    starts = it.row_starts(cu, t)
    tau = torch.empty(t, device=DEV, dtype=torch.float32)
    cstride = max(1, cap // 128, -(-t // 8192))
    n_cols = -(-t // cstride)
    smax = max(16, triton.next_power_of_2(n_cols))
    samp = torch.empty((t, smax), device=DEV, dtype=torch.float32)
    ks = w if k_scale is None else k_scale

    def sample():
        it._indexer_scores_kernel[(triton.cdiv(t, 64), triton.cdiv(n_cols, 128))](
            qi, ki, w, starts, samp, ks, 0, t, 0, n_cols, t, DI**-0.5, cstride,
            qi.stride(0), qi.stride(1), ki.stride(0), w.stride(0), samp.stride(0),
            H=HI, DI=DI, BM=64, BN=128, HAS_KS=k_scale is not None, num_warps=8,
        )  # fmt: skip

    def threshold():
        it._sample_threshold_kernel[(t,)](
            samp,
            starts,
            tau,
            0,
            0,
            cstride,
            n_cols,
            samp.stride(0),
            TOPK=TOPK,
            CAP=cap,
            SMAX=smax,
            num_warps=4,
        )

    ms = {"sample_scores": timeit(sample), "threshold": timeit(threshold)}
    return starts, tau, ms


def run_variant(qi, ki, w, starts, tau, k_scale, cap, bufs, v: dict) -> None:
    scr_s, scr_i, cnt = bufs[:3]
    t = qi.shape[0]
    w_in = w
    if v.get("fold") or v.get("k2"):
        w_in = (w.float() * DI**-0.5).contiguous()
    if v.get("k2"):
        _compact2_kernel[(triton.cdiv(t, v["bm"]),)](
            qi, ki, w_in, starts, tau, scr_s, scr_i, bufs[3], cnt, w if k_scale is None else k_scale,
            0, t, t, DI**-0.5, qi.stride(0), qi.stride(1), ki.stride(0), w_in.stride(0),
            H=HI, DI=DI, BM=v["bm"], BN=v["bn"], CAP=cap, HAS_KS=k_scale is not None, PACK=v.get("pack", False),
            num_warps=v["warps"], num_stages=v.get("stages", 3),
        )  # fmt: skip
        return
    _variant_kernel[(triton.cdiv(t, v["bm"]),)](
        qi, ki, w_in, starts, tau, scr_s, scr_i, cnt, w if k_scale is None else k_scale,
        0, t, t, DI**-0.5, qi.stride(0), qi.stride(1), ki.stride(0), w_in.stride(0),
        H=HI, DI=DI, BM=v["bm"], BN=v["bn"], CAP=cap, HAS_KS=k_scale is not None, MODE=v.get("mode", 0),
        UNROLL=v.get("unroll", False), FOLD=v.get("fold", False), num_warps=v["warps"], num_stages=v.get("stages", 3),
    )  # fmt: skip


def select(scr_s, scr_i, cnt, starts, t, cap, warps, packed=None, view32=False):
    idx = torch.full((t, TOPK), -1, dtype=torch.int32, device=DEV)
    sc = torch.full((t, TOPK), float("-inf"), dtype=torch.float32, device=DEV)
    miss = torch.zeros(t, device=DEV, dtype=torch.int32)
    if packed is not None:
        _select_packed_kernel[(t,)](
            packed.view(torch.int32) if view32 else packed, cnt, starts, idx, sc, miss, 0,
            TOPK=TOPK, KP=TOPK, CAP=cap, VIEW32=view32, num_warps=warps,
        )  # fmt: skip
        return idx, miss
    it._select_candidates_kernel[(t,)](
        scr_s, scr_i, cnt, starts, idx, sc, miss, 0, TOPK=TOPK, KP=TOPK, CAP=cap, num_warps=warps
    )
    return idx, miss


def profile(out: str, t: int, dtype: str, variants: list[dict], select_warps: list[int]) -> None:
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    g = torch.Generator(device=DEV).manual_seed(0)
    qi = torch.randn(t, HI, DI, device=DEV, dtype=BF, generator=g)
    ki = torch.randn(t, DI, device=DEV, dtype=BF, generator=g)
    w = (torch.randn(t, HI, device=DEV, dtype=torch.float32, generator=g) * HI**-0.5).to(BF)
    if DEV == "cpu":  # the interpreter computes in float32
        qi, ki, w = qi.float(), ki.float(), w.float()
    k_scale = None
    ref_idx, _ = it.indexer_topk(qi, ki, w, cu, TOPK)  # bf16 library result (for the FP8 recall)
    if dtype == "fp8":
        qi, w = quantize_indexer_query(qi, w)
        ki, k_scale = quantize_indexer_keys(ki)
        lib_idx, _ = it.indexer_topk(qi, ki, w, cu, TOPK, k_scale=k_scale)
    else:
        lib_idx = ref_idx
    ms_lib = timeit(lambda: it.indexer_topk(qi, ki, w, cu, TOPK, k_scale=k_scale), reps=3)
    cap = 4 * TOPK
    starts, tau, ms = prepare(qi, ki, w, cu, k_scale, cap)
    log(out, dtype=dtype, T=t, op="library_indexer_topk", ms=ms_lib, **ms)
    scr_s = torch.empty((t, cap), device=DEV, dtype=torch.float32)  # 4 GiB at 128K
    scr_i = torch.empty((t, cap), device=DEV, dtype=torch.int32)
    cnt = torch.empty(t, device=DEV, dtype=torch.int32)
    packed = (
        torch.empty((t, cap), device=DEV, dtype=torch.int64)
        if any(v.get("pack") for v in variants)
        else scr_s
    )
    bufs = (scr_s, scr_i, cnt, packed)
    base = dict(bm=64, bn=128, warps=4, stages=3)
    run_variant(qi, ki, w, starts, tau, k_scale, cap, bufs, base)
    cnt0 = cnt.clone()
    for sw in select_warps:
        ms_sel = timeit(lambda sw=sw: select(scr_s, scr_i, cnt0, starts, t, cap, sw))
        idx, miss = select(scr_s, scr_i, cnt0, starts, t, cap, sw)
        ok = int(miss.sum()) == 0 and bool(torch.equal(idx, lib_idx))
        log(out, dtype=dtype, T=t, op="select", warps=sw, ms=ms_sel, identical_to_library=ok,
            mean_candidates=round(float(cnt0.float().mean()), 1))  # fmt: skip
    for v in variants:
        try:
            ms_v = timeit(lambda v=v: run_variant(qi, ki, w, starts, tau, k_scale, cap, bufs, v))
        except Exception as e:  # e.g. out of shared memory: record and go on
            log(out, dtype=dtype, T=t, op="score_compact", variant=v, error=f"{type(e).__name__}: {e}"[:300])
            continue
        row = dict(dtype=dtype, T=t, op="score_compact", variant=v, ms=ms_v)
        if v.get("mode", 0) == 0:
            same_cnt = bool(torch.equal(cnt, cnt0))
            idx, miss = select(scr_s, scr_i, cnt, starts, t, cap, 4, packed if v.get("pack") else None)
            if v.get("pack"):
                row["select_packed_ms"] = timeit(lambda: select(scr_s, scr_i, cnt, starts, t, cap, 4, packed))
                row["select_packed_view32_ms"] = timeit(
                    lambda: select(scr_s, scr_i, cnt, starts, t, cap, 4, packed, True)
                )
                idx32, miss32 = select(scr_s, scr_i, cnt, starts, t, cap, 4, packed, True)
                row["view32_rows_identical"] = round(float((idx32 == lib_idx).all(1).float().mean()), 6)
            row.update(same_counts=same_cnt, topk_rows_identical=round(float((idx == lib_idx).all(1).float().mean()), 6),
                       misses=int(miss.sum()))  # fmt: skip
            if dtype == "fp8":
                rows = torch.arange(0, t, max(1, t // 2048), device=DEV)
                row["recall_vs_bf16"] = round(topk_recall(idx[rows], ref_idx[rows]), 4)
        log(out, **row)
    if DEV == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--quick", action="store_true", help="a few variants only")
    ap.add_argument(
        "--set2", action="store_true", help="second round: tiles without unrolling, packed stores"
    )
    ap.add_argument(
        "--set3", action="store_true", help="last round: baseline, k2, k2 + packed (both selects)"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="TRITON_INTERPRET=1 on CPU, small T (checks only)"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.cpu_smoke:
        global DEV
        DEV, args.t, args.dtypes, args.quick = "cpu", 300, "bf16", True
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    log(args.out, device=name, torch=torch.__version__, triton=triton.__version__)
    b = dict(bm=64, bn=128, warps=4, stages=3)
    variants = [
        b,
        {**b, "mode": 1},
        {**b, "mode": 2},
        {**b, "unroll": True},
        {**b, "fold": True},
        {**b, "unroll": True, "fold": True},
        {**b, "unroll": True, "fold": True, "mode": 1},
    ]
    if args.set3:
        variants = [b, {**b, "k2": True}, {**b, "k2": True, "pack": True}]
    elif args.set2:
        variants = [b, {**b, "warps": 8}, {**b, "stages": 2}, {**b, "bm": 128, "warps": 8}, {**b, "bm": 128, "stages": 2},
                    {**b, "bn": 64, "warps": 4}, {**b, "k2": True}, {**b, "k2": True, "pack": True},
                    {**b, "k2": True, "pack": True, "warps": 8}, {**b, "k2": True, "pack": True, "stages": 2},
                    {**b, "k2": True, "pack": True, "bm": 128, "warps": 8},
                    {**b, "k2": True, "pack": True, "bm": 128, "warps": 8, "stages": 2}]  # fmt: skip
    elif not args.quick:
        for bm, bn, warps, stages in [(64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 256, 8, 3),
                                      (128, 64, 8, 3), (64, 128, 4, 2), (64, 128, 4, 4), (32, 128, 4, 3),
                                      (128, 128, 4, 3)]:  # fmt: skip
            variants.append(dict(bm=bm, bn=bn, warps=warps, stages=stages, unroll=True, fold=True))
    if DEV == "cpu":
        variants = [variants[0], {**b, "k2": True}, {**b, "k2": True, "pack": True}]
    for dtype in args.dtypes.split(","):
        profile(args.out, args.t, dtype, variants, [4, 8, 16] if DEV == "cuda" else [8])


if __name__ == "__main__":
    main()
