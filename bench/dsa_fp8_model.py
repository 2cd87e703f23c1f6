"""H200 check of dsa.indexer_dtype=fp8 as a model option (issue 20): a `small`-preset DSA model (fewer layers, random
weights, bf16, KEYE_KERNELS=auto) prefills packed prompts and decodes greedily through the FP8 indexer key cache with
the Triton kernels. Every prefill top-k and every decode step's selection is compared (recall, exact-row fraction)
with the reference on the dequantised values (keye/kernels/indexer_fp8.py *_reference, float32 on the GPU); one
decode step's selection + attention is timed on the FP8 cache and on the same keys as a bf16 cache, and whole
generations are timed with the same weights in both indexer modes.

Usage: python bench/dsa_fp8_model.py [--layers 2] [--lens 32768,16384,9000,2100] [--new 16] [--out f.json]
       (--preset tiny --device cpu --lens 90,40 --new 4: a CPU dry run on the reference kernels)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cuda_timing import median_ms  # noqa: E402

from keye.kernels import dispatch, indexer_fp8  # noqa: E402
from keye.model import build_model, preset  # noqa: E402
from keye.model.generate import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lens", default="32768,16384,9000,2100")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--device", default="cuda"
    )  # cpu: a dry run of the script (tiny preset, reference kernels)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    lens = [int(x) for x in args.lens.split(",")]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = preset(args.preset, vocab_size=args.vocab, image_token_id=args.vocab - 1)
    cfg.lm.num_layers = args.layers
    cfg.set_attention_mode("dsa")
    cfg.lm.dsa.indexer_dtype = "fp8"
    model = build_model(cfg, seed=0, device=dev, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    dsa = cfg.lm.dsa
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab - 1, (n,), generator=g).tolist() for n in lens]

    rows: dict[str, list] = {"prefill": [], "decode": []}
    real_topk, real_dec = dispatch.indexer_topk_fp8, dispatch.dsa_decode_fp8
    step_args: list[tuple] = []

    def topk(*a):  # noqa: ANN002, ANN202
        got = real_topk(*a)
        want = indexer_fp8.indexer_topk_fp8_reference(*a)[0]
        rows["prefill"].append(
            (indexer_fp8.topk_recall(got[0], want), float((got[0] == want).float().mean()))
        )
        return got

    def dec(*a):  # noqa: ANN002, ANN202
        got = real_dec(*a)
        want = indexer_fp8.dsa_decode_fp8_reference(*a)[2]
        rows["decode"].append((indexer_fp8.topk_recall(got[2], want), float((got[2] == want).float().mean())))
        if not step_args:
            step_args.append(tuple(x.clone() if torch.is_tensor(x) else x for x in a))
        return got

    dispatch.indexer_topk_fp8, dispatch.dsa_decode_fp8 = topk, dec
    out: dict = {"backend": dispatch.backend_name("dsa_decode_fp8", torch.zeros(1, device=dev))}
    res_fp8 = generate(model, prompts, max_new_tokens=args.new, temperature=0.0)
    dispatch.indexer_topk_fp8, dispatch.dsa_decode_fp8 = real_topk, real_dec
    sync()
    out |= {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "lens": lens,
        "topk": dsa.topk,
        "index_heads": dsa.index_heads,
        "index_dim": dsa.index_dim,
        "new_tokens": args.new,
    }
    for kind, vals in rows.items():
        rec = [r for r, _ in vals]
        same = [s for _, s in vals]
        out[kind] = {
            "calls": len(vals),
            "recall_mean": sum(rec) / len(rec),
            "recall_min": min(rec),
            "exact_rows_mean": sum(same) / len(same),
        }
    # one decode step on the FP8 cache vs the same keys as a bf16 cache (the bf16 dsa_decode path)
    q, kc, vc, q_idx, k8, sk, w, cl, tk, sc = step_args[0]
    kbf = indexer_fp8.dequantize(k8, sk).to(torch.bfloat16)
    timer = median_ms if cuda else (lambda fn, reps, warmup: float("nan"))
    out["decode_step_ms"] = {
        "fp8_cache": timer(lambda: real_dec(q, kc, vc, q_idx, k8, sk, w, cl, tk, sc), reps=50, warmup=5),
        "bf16_cache": timer(
            lambda: dispatch.dsa_decode(q, kc, vc, q_idx, kbf, w, cl, tk, sc), reps=50, warmup=5
        ),
        "batch": int(q.shape[0]),
        "cache_rows": int(k8.shape[1]),
    }
    out["idx_cache_bytes_per_row"] = {"fp8": k8.shape[-1] + 4, "bf16": 2 * k8.shape[-1]}
    # whole generations, same weights, both indexer modes (greedy tokens agree until a selection flips)
    times = {}
    results = {}
    for mode in ("fp8", "bf16", "fp8"):
        cfg.lm.dsa.indexer_dtype = mode
        sync()
        t0 = time.perf_counter()
        results[mode] = generate(model, prompts, max_new_tokens=args.new, temperature=0.0)
        sync()
        times[mode] = time.perf_counter() - t0  # the second fp8 run (warm) overwrites the first
    out["generate_s"] = times
    agree = [
        sum(a == b for a, b in zip(ra.token_ids, rb.token_ids, strict=True)) / len(ra.token_ids)
        for ra, rb in zip(results["fp8"], results["bf16"], strict=True)
    ]
    out["greedy_token_agreement_fp8_vs_bf16"] = agree
    out["fp8_rerun_identical"] = [
        a.token_ids == b.token_ids for a, b in zip(res_fp8, results["fp8"], strict=True)
    ]
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
