"""Issue 20: can a two-pass indexer top-k (keye/kernels/indexer_twopass.py: a 16-bit score slab written by a scores-only
Triton kernel, then torch.topk + a sort of the k indices per row) beat the fused path (sampled threshold, score +
compact, exact select: keye/kernels/indexer_topk.py) toward <= 40 ms at 128K? Timed beside the library (bf16 and
FP8) and SDPA causal forward in the same run, with its floors: pass 1 alone (no selection), and one read of the slab
(`amax` per row: what any selection pass over a stored slab costs at least).

Checks first (T = 6000 packed [1777, 4223], k 2048): the float32 slab with the reference's tie rule vs
`indexer_topk_reference` (rows identical), the fast setting (fp16 slab) vs the library (recall), FP8 vs the library's
FP8 (recall); at 128K the recall of the fast setting vs the library on 2048 sampled rows.

  python bench/dsa_indexer_twopass.py --out OUT_DIR [--t 131072] [--triton-select]

--triton-select times the slab path with its Triton radix select (keye/kernels/indexer_twopass.py
`select_slab_triton`) after either score pass (the library's head loop or the resident-query kernel).
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

from keye.kernels.dsa_reference import indexer_topk_reference  # noqa: E402
from keye.kernels.indexer_fp8 import quantize_indexer_keys, quantize_indexer_query, topk_recall  # noqa: E402
from keye.kernels.indexer_topk import indexer_topk, row_starts  # noqa: E402
from keye.kernels.indexer_twopass import _chunks, indexer_topk_twopass, score_slab  # noqa: E402

TOPK, DEV = base.TOPK, base.DEV
ROWS: list[dict] = []


def log(out: str, **row: object) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "dsa_indexer_twopass.json"), "w") as f:
        json.dump(ROWS, f, indent=1)


def guarded(out: str, name: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # keep going: later measurements still count
        log(out, kind="error", op=name, error=repr(e)[:400], tb=traceback.format_exc()[-800:])
        torch.cuda.empty_cache()


def check(out: str) -> None:
    t = 6000
    cu = torch.tensor([0, 1777, t], device=DEV, dtype=torch.int32)
    _, _, _, qi, ki, w = base.make(t, 1)
    want, _ = indexer_topk_reference(qi, ki, w, cu, TOPK)
    exact, _ = indexer_topk_twopass(qi, ki, w, cu, TOPK, slab_dtype=torch.float32, ties="lowest")
    lib, _ = indexer_topk(qi, ki, w, cu, TOPK)
    fast, _ = indexer_topk_twopass(qi, ki, w, cu, TOPK)
    q8, wq = quantize_indexer_query(qi, w)
    k8, sk = quantize_indexer_keys(ki)
    lib8, _ = indexer_topk(q8, k8, wq, cu, TOPK, k_scale=sk)
    fast8, _ = indexer_topk_twopass(q8, k8, wq, cu, TOPK, k_scale=sk)
    log(out, kind="check", T=t, fp32_slab_rows_identical_to_reference=float((exact == want).all(1).float().mean()),
        library_rows_identical_to_reference=float((lib == want).all(1).float().mean()),
        fp16_slab_recall_vs_library=topk_recall(fast, lib), fp16_slab_rows_identical=float((fast == lib).all(1).float().mean()),
        fp8_fp16_slab_recall_vs_library_fp8=topk_recall(fast8, lib8))  # fmt: skip


def sdpa_ms(t: int) -> float:
    """SDPA causal forward at T (the dense baseline of the same run), GQA 32 / 4 heads, d 128."""
    q, k, v, _, _, _ = base.make(t, seed=1)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    return base.timeit(
        lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True), 3, 1
    )


def baselines(out: str, t: int):
    """The same-run baselines at T (SDPA causal forward, the library's bf16 / FP8 top-k) and the inputs: (cu, bf16
    q / k / w, FP8 q / k / w / key scales, the library's FP8 picks, the rows sampled for recall)."""
    cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
    log(out, kind="time", op="sdpa_causal_fwd", T=t, ms=round(sdpa_ms(t), 2))
    _, _, _, qi, ki, w = base.make(t, seed=1)
    q8, wq = quantize_indexer_query(qi, w)
    k8, sk = quantize_indexer_keys(ki)
    lib_bf = base.timeit(lambda: indexer_topk(qi, ki, w, cu, TOPK), 3, 1)
    lib_8 = base.timeit(lambda: indexer_topk(q8, k8, wq, cu, TOPK, k_scale=sk), 3, 1)
    log(out, kind="time", op="library_indexer_topk", T=t, bf16_ms=round(lib_bf, 2), fp8_ms=round(lib_8, 2))
    ref8, _ = indexer_topk(q8, k8, wq, cu, TOPK, k_scale=sk)
    rows = torch.arange(TOPK, t, max(1, t // 2048), device=DEV)
    return cu, qi, ki, w, q8, k8, wq, sk, ref8, rows


def bench(out: str, t: int) -> None:
    cu, qi, ki, w, q8, k8, wq, sk, ref8, rows = baselines(out, t)
    starts = row_starts(cu, t)
    slow: list[float] = []
    for slab_gib, tile in ((4, (64, 128, 4)), (8, (64, 128, 4)), (2, (64, 128, 4)), (4, (128, 128, 8))):
        if slow:  # the first setting was far off the target: the others are not worth the device time
            break
        kw = dict(slab_bytes=slab_gib << 30, tile=tile)

        def one(kw=kw, slab_gib=slab_gib, tile=tile) -> None:
            p1 = base.timeit(
                lambda: indexer_topk_twopass(q8, k8, wq, cu, TOPK, k_scale=sk, select=False, **kw), 3, 1
            )
            full = base.timeit(lambda: indexer_topk_twopass(q8, k8, wq, cu, TOPK, k_scale=sk, **kw), 3, 1)
            if full > 400:
                slow.append(full)
            got, _ = indexer_topk_twopass(q8, k8, wq, cu, TOPK, k_scale=sk, **kw)
            # one read of every slab (the floor of any selection pass over a stored slab)
            wf = (wq.float() * qi.shape[2] ** -0.5).contiguous()
            reads, n_bytes = 0.0, 0
            for a, b, c0 in _chunks(starts.tolist(), 0, t, tile[0], kw["slab_bytes"], 2):
                slab = score_slab(q8, k8, wf, starts, a, b, c0, torch.float16, tile, sk)
                reads += base.timeit(lambda slab=slab: slab.amax(1), 3, 1)
                n_bytes += slab.numel() * 2
                del slab
            log(out, kind="time", op="twopass_fp8", T=t, slab_gib=slab_gib, tile=list(tile), total_ms=round(full, 2),
                pass1_ms=round(p1, 2), select_ms=round(full - p1, 2), slab_read_ms=round(reads, 2),
                slab_gb=round(n_bytes / 1e9, 2), recall_vs_library_fp8=topk_recall(got[rows], ref8[rows]),
                rows_identical=float((got[rows] == ref8[rows]).all(1).float().mean()))  # fmt: skip

        guarded(out, f"twopass {slab_gib} GiB {tile}", one)
    guarded(out, "twopass bf16", lambda: log(out, kind="time", op="twopass_bf16", T=t,
            total_ms=round(base.timeit(lambda: indexer_topk_twopass(qi, ki, w, cu, TOPK), 3, 1), 2)))  # fmt: skip


RESIDENT = (
    16,
    64,
    4,
    3,
    True,
    False,
    True,
)  # keys on M, heads in registers: bench/RESULTS.md helper k20's best


def check_triton(out: str) -> None:
    """T = 6000 packed: the Triton select on a float16 slab equals torch's top-k with the reference's tie rule on the
    same slab; the resident pass 1 with it vs the library pass 1 (recall: fp32 sums in another order)."""
    t = 6000
    cu = torch.tensor([0, 1777, t], device=DEV, dtype=torch.int32)
    _, _, _, qi, ki, w = base.make(t, 1)
    q8, wq = quantize_indexer_query(qi, w)
    k8, sk = quantize_indexer_keys(ki)
    row = {}
    for name, args in (("bf16", (qi, ki, w, {})), ("fp8", (q8, k8, wq, {"k_scale": sk}))):
        q, k, ww, kw = args
        want, _ = indexer_topk_twopass(q, k, ww, cu, TOPK, ties="lowest", **kw)
        got, _ = indexer_topk_twopass(q, k, ww, cu, TOPK, selector="triton", **kw)
        res, _ = indexer_topk_twopass(q, k, ww, cu, TOPK, selector="triton", tile=RESIDENT, **kw)
        row[f"{name}_triton_select_rows_identical_to_torch_lowest"] = float(
            (got == want).all(1).float().mean()
        )
        row[f"{name}_resident_pass1_recall"] = topk_recall(res, want)
        row[f"{name}_resident_pass1_rows_identical"] = float((res == want).all(1).float().mean())
    log(out, kind="check_triton_select", T=t, **row)


def bench_triton(out: str, t: int) -> None:
    """The slab path with the Triton select: pass 1 (library head loop or resident queries) alone and with the
    select, slab chunk sizes, select chunk / warps; library FP8 / bf16 and SDPA in the same run."""
    cu, qi, ki, w, q8, k8, wq, sk, ref8, rows = baselines(out, t)
    grid = [("library", (64, 128, 4), 2, 4096, 4), ("resident", RESIDENT, 2, 4096, 4),
            ("resident", RESIDENT, 4, 4096, 4), ("resident", RESIDENT, 1, 4096, 4),
            ("resident", RESIDENT, 2, 2048, 4), ("resident", RESIDENT, 2, 8192, 8),
            ("resident", RESIDENT, 2, 4096, 8), ("resident", RESIDENT, 2, 2048, 2)]  # fmt: skip
    for p1, tile, gib, chunk, warps in grid:

        def one(p1=p1, tile=tile, gib=gib, chunk=chunk, warps=warps) -> None:
            kw = dict(slab_bytes=gib << 30, tile=tile, selector="triton", select_chunk=chunk, select_warps=warps,
                      k_scale=sk)  # fmt: skip
            p1_ms = base.timeit(lambda: indexer_topk_twopass(q8, k8, wq, cu, TOPK, select=False, **kw), 3, 1)
            full = base.timeit(lambda: indexer_topk_twopass(q8, k8, wq, cu, TOPK, **kw), 3, 1)
            got, _ = indexer_topk_twopass(q8, k8, wq, cu, TOPK, **kw)
            log(out, kind="time", op="twopass_triton_fp8", T=t, pass1=p1, tile=list(tile), slab_gib=gib,
                select_chunk=chunk, select_warps=warps, total_ms=round(full, 2), pass1_ms=round(p1_ms, 2),
                select_ms=round(full - p1_ms, 2), recall_vs_library_fp8=topk_recall(got[rows], ref8[rows]),
                rows_identical=float((got[rows] == ref8[rows]).all(1).float().mean()))  # fmt: skip

        guarded(out, f"twopass triton {p1} {gib} {chunk} {warps}", one)
    for p1, tile in (("library", (64, 128, 4)), ("resident", RESIDENT)):
        kw = dict(slab_bytes=2 << 30, tile=tile, selector="triton")
        guarded(out, f"twopass triton bf16 {p1}", lambda kw=kw, p1=p1: log(
            out, kind="time", op="twopass_triton_bf16", T=t, pass1=p1,
            total_ms=round(base.timeit(lambda: indexer_topk_twopass(qi, ki, w, cu, TOPK, **kw), 3, 1), 2)))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument(
        "--triton-select", action="store_true", help="the Triton select runs only (not torch.topk's)"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tf, bw = base.ceilings()
    log(
        args.out,
        kind="setup",
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        matmul_tflops=tf,
        copy_gbs=bw,
    )
    if args.triton_select:
        guarded(args.out, "check triton", lambda: check_triton(args.out))
        bench_triton(args.out, args.t)
        return
    guarded(args.out, "check", lambda: check(args.out))
    bench(args.out, args.t)


if __name__ == "__main__":
    main()
