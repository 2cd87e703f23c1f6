"""Per-kernel GPU time of the DSA paths (torch.profiler), to see which kernel of a chain costs what.

bench/dsa.py times whole operations against dense SDPA; this splits them: the fused indexer top-k (sample scores,
threshold, score + compact, select), the decode step (threshold, segment compaction, select, split-K attention,
merge) and the sparse attention forward. Same shapes as bench/dsa.py (30B-A3B attention, `30b-a3b` indexer, k=2048).

  python bench/dsa_profile.py --out OUT_DIR [--t 131072] [--cache 131072] [--batches 1,8] [--parts indexer,sparse,decode]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keye.kernels.decode import dsa_decode  # noqa: E402
from keye.kernels.indexer_topk import indexer_topk  # noqa: E402
from keye.kernels.sparse_attention import sparse_attention_fwd  # noqa: E402

HQ, HKV, D = 32, 4, 128
HI, DI, TOPK = 16, 64, 2048
DEV, BF = "cuda", torch.bfloat16


def kernel_times(fn, reps: int) -> list[dict]:
    """Mean microseconds per call of every GPU kernel `fn` launches, over `reps` profiled calls after a warm-up."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            total[ev.name] += ev.device_time
            count[ev.name] += 1
    rows = [
        {"kernel": name, "us_per_call": round(total[name] / reps, 2), "launches_per_call": count[name] / reps}
        for name in total
    ]
    return sorted(rows, key=lambda r: -r["us_per_call"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument("--cache", type=int, default=131072)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--parts", default="indexer,sparse,decode")
    args = ap.parse_args()
    out: dict[str, list[dict]] = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    t = args.t

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEV, dtype=BF, generator=g)

    parts = args.parts.split(",")
    if "indexer" in parts or "sparse" in parts:
        idx_in = (
            rand(t, HI, DI),
            rand(t, DI),
            rand(t, HI),
            torch.tensor([0, t], device=DEV, dtype=torch.int32),
        )
        if "indexer" in parts:
            out[f"indexer_topk_T{t}"] = kernel_times(lambda x=idx_in: indexer_topk(*x, TOPK), reps=2)
        ind = indexer_topk(*idx_in, TOPK)[0]
        del idx_in
        att_in = (rand(t, HQ, D), rand(t, HKV, D), rand(t, HKV, D), ind)
        if "sparse" in parts:
            out[f"sparse_fwd_T{t}"] = kernel_times(lambda x=att_in: sparse_attention_fwd(*x, D**-0.5), reps=3)
        del att_in, ind
    for bsz in [int(x) for x in args.batches.split(",") if x and "decode" in parts]:
        lc = args.cache
        dec_in = (
            rand(bsz, HQ, D), rand(bsz, lc, HKV, D), rand(bsz, lc, HKV, D), rand(bsz, HI, DI), rand(bsz, lc, DI),
            rand(bsz, HI), torch.full((bsz,), lc, device=DEV, dtype=torch.int32),
        )  # fmt: skip
        out[f"decode_B{bsz}_L{lc}"] = kernel_times(lambda x=dec_in: dsa_decode(*x, TOPK, D**-0.5), reps=50)
        del dec_in
    for name, rows in out.items():
        print(f"== {name}: {sum(r['us_per_call'] for r in rows):.1f} us of kernels per call")
        for r in rows:
            print(f"   {r['us_per_call']:10.2f} us  x{r['launches_per_call']:.0f}  {r['kernel'][:90]}")
    with open(os.path.join(args.out, "dsa_profile.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
