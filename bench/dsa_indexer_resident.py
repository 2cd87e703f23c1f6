"""Resident-query indexer (keye/kernels/indexer_resident.py) vs the library's head-loop kernel at 128K, same run.

Times, per dtype (FP8 first, then bf16; 30B-A3B indexer H_I 16 / D_I 64, k 2048, one T-token sequence, random
inputs, the inputs of bench/dsa_indexer_profile.py):
  - the library's indexer + top-k (total), its links (sample + threshold, score + compact, scores only, select);
  - the resident kernel's scores-only pass (MODE 1: a row max stored) for many tiles (BM queries, BN keys, warps,
    stages, keys-on-M or queries-on-M, head sum by reduction or by a second dot), the row max checked against the
    library's scores-only pass;
  - for the fastest scores-only tiles: the resident score + compact link (candidate counts and the selected top-k
    compared with the library's) and the full indexer + top-k with it (rows identical to the library, recall);
  - SDPA causal forward at T (32 q / 4 KV heads, d 128) as the dense reference.
Before timing: resident scores and top-k vs the torch reference at T=6000 packed [1777, 4223] (bf16, FP8).

  python bench/dsa_indexer_resident.py --out OUT_DIR [--t 131072] [--dtypes fp8,bf16] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dsa_indexer_profile as prof  # noqa: E402  (bench/, the script's folder)

from keye.kernels import indexer_topk as it  # noqa: E402
from keye.kernels.dsa_reference import indexer_scores_block, indexer_topk_reference  # noqa: E402
from keye.kernels.indexer_fp8 import (  # noqa: E402
    dequantize,
    quantize_indexer_keys,
    quantize_indexer_query,
    quantize_rows,
    topk_recall,
)
from keye.kernels.indexer_resident import launch_resident, resident_scores  # noqa: E402

HI, DI, TOPK, DEV, BF = prof.HI, prof.DI, prof.TOPK, "cuda", torch.bfloat16
ROWS: list[dict] = []
T0 = time.time()


def log(out: str, **row: object) -> None:
    row["wall_s"] = round(time.time() - T0, 1)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "dsa_indexer_resident.json"), "w") as f:
        json.dump(ROWS, f, indent=1)


def check_small(out: str) -> None:
    """Resident scores / top-k vs the torch reference at T=6000 packed [1777, 4223] (bf16 values, fp32 math)."""
    t = 6000
    cu = torch.tensor([0, 1777, t], device=DEV, dtype=torch.int32)
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(t, HI, DI, device=DEV, dtype=BF, generator=g)
    k = torch.randn(t, DI, device=DEV, dtype=BF, generator=g)
    w = (torch.randn(t, HI, device=DEV, generator=g) * HI**-0.5).to(BF)
    q8, wq = quantize_indexer_query(q, w)
    k8, sk = quantize_indexer_keys(k)
    _, sq = quantize_rows(q)
    qd, kd = dequantize(q8, sq), dequantize(k8, sk)
    for dtype, args, ref in (("bf16", (q, k, w, None), (q, k, w)), ("fp8", (q8, k8, wq, sk), (qd, kd, w))):
        want = torch.full((t, t), float("-inf"), device=DEV)
        for a, b in ((0, 1777), (1777, t)):
            want[a:b, a:b] = indexer_scores_block(*ref, a, a, b)
        fin = torch.isfinite(want)
        for tile in ((8, 64, 4, 3, True, False, True), (8, 64, 4, 3, True, False, True, True, True),
                     (16, 64, 8, 3, False), (8, 64, 4, 3, True, True)):  # fmt: skip
            try:
                got = resident_scores(args[0], args[1], args[2], cu, k_scale=args[3], tile=tile)
            except Exception as e:  # noqa: BLE001
                log(
                    out,
                    check="scores_vs_reference",
                    dtype=dtype,
                    tile=tile,
                    error=f"{type(e).__name__}: {e}"[:300],
                )
                continue
            rel = float(((got[fin] - want[fin]).abs() / want[fin].abs().clamp(min=1e-3)).max())
            log(out, check="scores_vs_reference", dtype=dtype, tile=tile, masks_equal=bool(torch.equal(
                torch.isfinite(got), fin)), max_rel=rel)  # fmt: skip
        ridx, _ = indexer_topk_reference(*ref, cu, 256)
        lidx, _ = it.indexer_topk(args[0], args[1], args[2], cu, 256, k_scale=args[3])
        log(out, check="topk_vs_reference", dtype=dtype, tile="library", T=t, k=256,
            rows_identical=round(float((lidx == ridx).all(1).float().mean()), 6))  # fmt: skip
        for tile in ((8, 64, 4, 3, True, False, True), (8, 64, 4, 3, True, False, True, True),
                     (8, 64, 4, 3, True, False, True, False, True), (8, 64, 4, 3, True, True)):  # fmt: skip
            try:
                idx, _ = it.indexer_topk(
                    args[0], args[1], args[2], cu, 256, k_scale=args[3], resident_tile=tile
                )
            except Exception as e:  # noqa: BLE001
                log(
                    out,
                    check="topk_vs_reference",
                    dtype=dtype,
                    tile=tile,
                    error=f"{type(e).__name__}: {e}"[:300],
                )
                continue
            log(out, check="topk_vs_reference", dtype=dtype, tile=tile, T=t, k=256,
                rows_identical=round(float((idx == ridx).all(1).float().mean()), 6),
                recall=round(topk_recall(idx, ridx), 6))  # fmt: skip


def ttgir_stats(compiled) -> dict:
    try:
        ir = compiled.asm["ttgir"]
    except Exception as e:  # noqa: BLE001
        return {"ttgir": f"unavailable: {e}"[:80]}
    return {
        "convert_layout": ir.count("convert_layout"),
        "local_alloc": ir.count("local_alloc"),
        "warp_group_dot": ir.count("warp_group_dot"),
        "ttg_dot": ir.count("tt.dot "),
        "regs": getattr(compiled, "n_regs", None),
        "spills": getattr(compiled, "n_spills", None),
        "smem": getattr(compiled, "metadata", None) and getattr(compiled.metadata, "shared", None),
    }


def _full(
    out,
    dtype,
    t,
    tile,
    ms_s,
    qi,
    ki,
    w,
    w_folded,
    cu,
    starts,
    tau,
    scr_s,
    scr_i,
    cnt,
    cnt0,
    k_scale,
    cap,
    lib_idx,
    ms_lib,
):  # noqa: PLR0913
    run = lambda tile=tile: launch_resident(  # noqa: E731
        qi, ki, w_folded, starts, 0, t, 2, tile, tau, scr_s, scr_i, cnt, k_scale, cap=cap
    )
    ms_c = prof.timeit(run)
    run()
    idx, miss = prof.select(scr_s, scr_i, cnt, starts, t, cap, 4)
    full = lambda tile=tile: it.indexer_topk(qi, ki, w, cu, TOPK, k_scale=k_scale, resident_tile=tile)  # noqa: E731
    fidx, _ = full()
    ms_full = prof.timeit(full, reps=3)
    rows = torch.arange(0, t, max(1, t // 2048), device=DEV)
    log(out, dtype=dtype, T=t, op="resident_full", tile=tile, scores_only_ms=ms_s, score_compact_ms=ms_c,
        counts_equal_frac=round(float((cnt == cnt0).float().mean()), 6), misses=int(miss.sum()),
        select_rows_identical=round(float((idx == lib_idx).all(1).float().mean()), 6),
        indexer_topk_ms=ms_full, library_ms=ms_lib,
        full_rows_identical=round(float((fidx == lib_idx).all(1).float().mean()), 6),
        recall_vs_library=round(topk_recall(fidx[rows], lib_idx[rows]), 6))  # fmt: skip


def profile(out: str, t: int, dtype: str, tiles: list[tuple], n_full: int, deadline: float) -> None:
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    g = torch.Generator(device=DEV).manual_seed(0)
    qi = torch.randn(t, HI, DI, device=DEV, dtype=BF, generator=g)
    ki = torch.randn(t, DI, device=DEV, dtype=BF, generator=g)
    w = (torch.randn(t, HI, device=DEV, dtype=torch.float32, generator=g) * HI**-0.5).to(BF)
    k_scale = None
    if DEV == "cpu":  # the interpreter computes in float32
        qi, ki, w = qi.float(), ki.float(), w.float()
    if dtype == "fp8":
        qi, w = quantize_indexer_query(qi, w)
        ki, k_scale = quantize_indexer_keys(ki)
    lib = lambda: it.indexer_topk(qi, ki, w, cu, TOPK, k_scale=k_scale)  # noqa: E731
    lib_idx, _ = lib()
    ms_lib = prof.timeit(lib, reps=3)
    cap = 4 * TOPK
    starts, tau, ms = prof.prepare(qi, ki, w, cu, k_scale, cap)
    log(out, dtype=dtype, T=t, op="library_indexer_topk", ms=ms_lib, **ms)
    scr_s = torch.empty((t, cap), device=DEV, dtype=torch.float32)
    scr_i = torch.empty((t, cap), device=DEV, dtype=torch.int32)
    cnt = torch.empty(t, device=DEV, dtype=torch.int32)
    bufs = (scr_s, scr_i, cnt, scr_s)
    b = dict(bm=64, bn=128, warps=4, stages=3)
    ms_k2 = prof.timeit(
        lambda: prof.run_variant(qi, ki, w, starts, tau, k_scale, cap, bufs, {**b, "k2": True})
    )
    prof.run_variant(qi, ki, w, starts, tau, k_scale, cap, bufs, {**b, "k2": True})
    cnt0 = cnt.clone()
    ms_sel = prof.timeit(lambda: prof.select(scr_s, scr_i, cnt0, starts, t, cap, 4))
    log(out, dtype=dtype, T=t, op="library_links", score_compact_ms=ms_k2, select_ms=ms_sel,
        mean_candidates=round(float(cnt0.float().mean()), 1))  # fmt: skip
    for v in ({**b, "mode": 1}, {**b, "mode": 1, "fold": True}):
        ms_v = prof.timeit(lambda v=v: prof.run_variant(qi, ki, w, starts, tau, k_scale, cap, bufs, v))
        log(out, dtype=dtype, T=t, op="library_scores_only", variant=v, ms=ms_v)
    best0 = cnt.clone().view(torch.float32)  # the library's row max (last run: folded)
    w_folded = (w.float() * DI**-0.5).contiguous()
    results = []
    for tile in tiles:
        if time.time() > deadline:
            log(out, dtype=dtype, op="stopped", reason="budget", skipped=len(tiles) - len(results))
            break
        try:
            run = lambda tile=tile: launch_resident(  # noqa: E731
                qi, ki, w_folded, starts, 0, t, 1, tile, cnt=cnt, k_scale=k_scale
            )
            ms_v = prof.timeit(run)
        except Exception as e:  # noqa: BLE001  (e.g. out of shared memory / registers: record and go on)
            log(
                out, dtype=dtype, op="resident_scores_only", tile=tile, error=f"{type(e).__name__}: {e}"[:300]
            )
            continue
        rel = float(((cnt.view(torch.float32) - best0).abs() / best0.abs().clamp(min=1e-3)).max())
        row = dict(dtype=dtype, T=t, op="resident_scores_only", tile=tile, ms=ms_v, rowmax_max_rel=rel)
        # IR statistics (and the TTGIR file) of every tile
        try:
            row.update(ttgir_stats(run()))
            if DEV == "cuda":
                with open(os.path.join(out, f"ttgir_{dtype}_{'_'.join(map(str, tile))}.mlir"), "w") as f:
                    f.write(run().asm.get("ttgir", ""))
        except Exception as e:  # noqa: BLE001
            row["ttgir"] = f"{type(e).__name__}: {e}"[:120]
        log(out, **row)
        results.append((ms_v, tile))
    results.sort(key=lambda r: r[0])
    fulls = []
    for _, tile in results[:n_full]:
        for trans in (False, True):  # the compaction on the [BN, BM] tile or on its transpose
            ft = (tuple(tile) + (False,) * 10)[:10]
            ft = ft[:7] + (trans,) + ft[8:]
            if len(tile) > 5 and not tile[5] and ft not in fulls:
                fulls.append(ft)
    for tile in fulls:
        ms_s = {(tuple(r[1]) + (False,) * 10)[:10]: r[0] for r in results}.get(
            tile[:7] + (False,) + tile[8:], 0.0
        )
        try:
            _full(
                out,
                dtype,
                t,
                tile,
                ms_s,
                qi,
                ki,
                w,
                w_folded,
                cu,
                starts,
                tau,
                scr_s,
                scr_i,
                cnt,
                cnt0,
                k_scale,
                cap,
                lib_idx,
                ms_lib,
            )
        except Exception as e:  # noqa: BLE001
            log(out, dtype=dtype, op="resident_full", tile=tile, error=f"{type(e).__name__}: {e}"[:300])
    if DEV == "cuda":
        torch.cuda.empty_cache()


def sdpa(out: str, t: int) -> None:
    g = torch.Generator(device=DEV).manual_seed(3)
    q = torch.randn(1, 32, t, 128, device=DEV, dtype=BF, generator=g)
    k = torch.randn(1, 4, t, 128, device=DEV, dtype=BF, generator=g)
    v = torch.randn(1, 4, t, 128, device=DEV, dtype=BF, generator=g)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    log(out, op="sdpa_causal_fwd", T=t, ms=prof.timeit(fn, reps=3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument("--dtypes", default="fp8,bf16")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new variants after this")
    ap.add_argument(
        "--n-full", type=int, default=3, help="fastest scores-only tiles run through the full path"
    )
    ap.add_argument("--tiles", default="", help="json list of tiles (default: the sweep below)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="TRITON_INTERPRET=1 on CPU, T=300, bf16, 3 tiles"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    if args.cpu_smoke:
        global DEV
        DEV = prof.DEV = "cpu"
        args.t, args.dtypes, args.no_check = 300, "bf16", True
        args.tiles = "[[8, 64, 4, 3, true, false, true], [8, 64, 4, 3, true, false, true, false, true]]"
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    log(args.out, device=name, torch=torch.__version__, triton=triton.__version__)
    if not args.no_check:
        check_small(args.out)
    # (BM, BN, warps, stages, keys on M[, head sum as a second dot])
    # (BM, BN, warps, stages, keys on M, head sum as a second dot, heads in registers (perm), trans, swp)
    P = (True, False, True)
    tiles = [
        (8, 128, 4, 3, True), (16, 64, 4, 3, *P), (8, 64, 4, 3, *P), (8, 128, 4, 3, *P), (16, 128, 4, 3, *P),
        (16, 64, 4, 4, *P), (16, 64, 4, 3, *P, False, True), (16, 64, 4, 3, *P, False, False, True),
        (8, 128, 4, 3, *P, False, False, True), (16, 64, 8, 3, *P, False, False, True), (16, 64, 4, 3, *P, True),
    ]  # fmt: skip
    if args.tiles:
        tiles = [tuple(x) for x in json.loads(args.tiles)]
    dtypes = args.dtypes.split(",")
    for i, dtype in enumerate(dtypes):
        share = (args.budget_s - (time.time() - T0)) / (len(dtypes) - i)
        profile(args.out, args.t, dtype, tiles, args.n_full, time.time() + share)
    if DEV == "cuda":
        sdpa(args.out, args.t)


if __name__ == "__main__":
    main()
