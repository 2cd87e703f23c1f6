"""H200 benchmark of the whole MoE layer (router, routing, permutation, expert GEMMs, un-permutation), fwd + bwd.

30B-A3B layer shape: hidden 2048, 128 experts, top-8, expert width 768, 64K tokens, bf16. Three implementations in
one run: keye.kernels.moe (Triton glue + torch._grouped_mm), a plain torch._grouped_mm layer, and the per-expert
loop of moe_reference; plus the bf16 matmul rate measured in the same run. Checks before it times.

  python bench/moe.py --out OUT_DIR [--tokens 65536]
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

from cuda_timing import median_ms  # noqa: E402  (bench/, the script's folder)

from keye.kernels.moe import moe_experts, moe_layer  # noqa: E402
from keye.kernels.moe_reference import experts_reference, moe_reference, route  # noqa: E402

H, E, K, FF = 2048, 128, 8, 768
DEV, BF = "cuda", torch.bfloat16
RESULTS: list[dict] = []


def log(**row: object) -> None:
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def timeit(fn, reps: int = 10, warmup: int = 2) -> float:
    return median_ms(fn, reps, warmup)


def plain_grouped_mm_layer(x, w_router, w_gate, w_up, w_down, top_k):
    """The plain baseline: torch ops end to end (argsort permutation, index gather, grouped_mm, index_add)."""
    topk_idx, topk_weight, _ = route(x @ w_router, top_k)
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w_gate.shape[0]), 0).to(torch.int32)
    tok = order // top_k
    xs = x[tok]
    h = F.silu(torch._grouped_mm(xs, w_gate, offs=offs)) * torch._grouped_mm(xs, w_up, offs=offs)
    ys = torch._grouped_mm(h, w_down, offs=offs) * topk_weight.reshape(-1)[order].to(x.dtype)[:, None]
    return x.new_zeros(x.shape).index_add(0, tok, ys)


def loop_layer(x, w_router, w_gate, w_up, w_down, top_k):
    return moe_reference(x, x @ w_router, w_gate, w_up, w_down, top_k)[0]


def params(t: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(t, H, device=DEV, dtype=BF, generator=g)
    wr = (torch.randn(H, E, device=DEV, generator=g) * H**-0.5).to(BF)
    wg = (torch.randn(E, H, FF, device=DEV, generator=g) * H**-0.5).to(BF)
    wu = (torch.randn(E, H, FF, device=DEV, generator=g) * H**-0.5).to(BF)
    wd = (torch.randn(E, FF, H, device=DEV, generator=g) * FF**-0.5).to(BF)
    return [p.requires_grad_() for p in (x, wr, wg, wu, wd)]


def rel(a, b) -> float:
    return float(
        (a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp(min=1e-30)
    )


def fwd_bwd(layer, ps, dy):
    y = layer(*ps, K)
    y = y[0] if isinstance(y, tuple) else y
    return (y, *torch.autograd.grad(y, ps, dy))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=65536)
    args = ap.parse_args()
    log(
        kind="env",
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    a = torch.randn(8192, 8192, device=DEV, dtype=BF)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF)
    mm = 2 * 8192**3 / timeit(lambda: a @ b, reps=20, warmup=5) / 1e9
    log(kind="ceiling", matmul_tflops=round(mm, 1))
    # check in bf16 against the fp32 per-expert loop on the same bf16 values and the same routing (routing from
    # bf16 vs fp32 logits may pick different experts for near-ties, which is not a kernel error)
    x, wr, wg, wu, wd = params(4096, 1)
    idx, wts, _ = route((x @ wr).detach(), K)
    wts = wts.detach().requires_grad_()
    dy = torch.randn(4096, H, device=DEV, dtype=BF)
    leaves = [x, wts, wg, wu, wd]
    y = moe_experts(x, idx, wts, wg, wu, wd)
    got = (y, *torch.autograd.grad(y, leaves, dy))
    l32 = [p.detach().float().requires_grad_() for p in leaves]
    y32 = experts_reference(l32[0], idx, *l32[1:])
    want = (y32, *torch.autograd.grad(y32, l32, dy.float()))
    errs = [rel(a_, b_) for a_, b_ in zip(got, want, strict=True)]
    log(kind="check", names=["y", "dx", "dtopk_weight", "dw_gate", "dw_up", "dw_down"], rel=errs)
    assert max(errs) < 2e-2, errs
    t = args.tokens
    ps = params(t)
    dy = torch.randn(t, H, device=DEV, dtype=BF)
    flops = 3 * (t * K * 6 * H * FF + 2 * t * H * E)
    for name, layer, reps in (
        ("keye_moe", moe_layer, 10),
        ("plain_grouped_mm", plain_grouped_mm_layer, 10),
        ("per_expert_loop", loop_layer, 3),
    ):
        ms = timeit(lambda layer=layer: fwd_bwd(layer, ps, dy), reps=reps)
        log(kind="time", impl=name, T=t, ms=ms, tflops=flops / ms / 1e9, frac_of_matmul=flops / ms / 1e9 / mm)
    # the three expert GEMMs alone (fwd + bwd), to split GEMM time from glue
    xs = torch.randn(t * K, H, device=DEV, dtype=BF, requires_grad=True)
    counts = torch.full((E,), t * K // E, device=DEV)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    wg, wu, wd = (p.detach().requires_grad_() for p in ps[2:])
    g_ = torch.randn(t * K, H, device=DEV, dtype=BF)

    def gemms():
        hh = torch._grouped_mm(xs, wg, offs=offs) * torch._grouped_mm(xs, wu, offs=offs)
        ys = torch._grouped_mm(hh, wd, offs=offs)
        torch.autograd.grad(ys, (xs, wg, wu, wd), g_)

    ms_g = timeit(gemms, reps=10)
    gflops = 3 * t * K * 6 * H * FF
    log(
        kind="time",
        impl="grouped_mm_gemms_only(balanced)",
        T=t,
        ms=ms_g,
        tflops=gflops / ms_g / 1e9,
        frac_of_matmul=gflops / ms_g / 1e9 / mm,
    )
    with open(os.path.join(args.out, "moe.jsonl"), "w") as f:
        for row in RESULTS:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
