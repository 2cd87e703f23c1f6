"""One model decode step on the FP8 indexer key cache vs the bf16 one, eager and replayed from a CUDA graph (issue
20: "decode stays <= 0.2x dense at batch 8 (CUDA graph) and gains the FP8 key cache").

Why: `bench/dsa_fp8_model.py` found the model's eager FP8 step at batch 4 / 32K rows 2.2x slower than bf16 (0.641
vs 0.294 ms), while the decode top-k alone under a CUDA graph was faster on FP8 (0.0866 vs 0.0945 ms at batch 8,
128K). The model's FP8 step also quantises the new token's indexer query (and writes its e4m3 key with a scale):
about ten small launches, now done inside the kernels (`decode_topk(quantize_query=True)`, `write_fp8_rows`). This times the whole step as the model runs it (`indexer_fp8.dsa_decode_fp8` + the new
key's quantisation vs `decode.dsa_decode`), and dense SDPA decode, both ways, on the 30B-A3B attention shape.

  python bench/dsa_fp8_decode_graph.py [--batches 4,8] [--lens 32768,131072] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cuda_timing import graph_replay_ms, median_ms  # noqa: E402

from keye.kernels import indexer_fp8  # noqa: E402
from keye.kernels.decode import dsa_decode, write_fp8_rows  # noqa: E402

HQ, HKV, D, HI, DI, TOPK = 32, 4, 128, 16, 64, 2048


def one_size(bsz: int, length: int) -> dict:
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(bsz, length, HKV, D, device=dev, dtype=bf, generator=g)
    vc = torch.randn(bsz, length, HKV, D, device=dev, dtype=bf, generator=g)
    kic = torch.randn(bsz, length, DI, device=dev, dtype=bf, generator=g)
    k8, ks = indexer_fp8.quantize_indexer_keys(kic)
    q = torch.randn(bsz, HQ, D, device=dev, dtype=bf, generator=g)
    qi = torch.randn(bsz, HI, DI, device=dev, dtype=bf, generator=g)
    w = torch.randn(bsz, HI, device=dev, dtype=bf, generator=g)
    new_k = torch.randn(bsz, DI, device=dev, dtype=bf, generator=g)
    lens = torch.full((bsz,), length, device=dev, dtype=torch.int32)
    scale = D**-0.5
    at = torch.full((bsz,), length - 1, device=dev, dtype=torch.int64)

    def bf16_step():
        kic[:, -1] = new_k  # the cache write of the new indexer key
        return dsa_decode(q, kc, vc, qi, kic, w, lens, TOPK, scale)

    def fp8_step():
        write_fp8_rows(new_k, k8, ks, at)  # the new key as the model's FP8 cache writes it (one fused launch)
        return indexer_fp8.dsa_decode_fp8(q, kc, vc, qi, k8, ks, w, lens, TOPK, scale)

    qd, kd, vd = q[:, :, None, :], kc.permute(0, 2, 1, 3).contiguous(), vc.permute(0, 2, 1, 3).contiguous()

    def dense_step():
        return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

    recall = indexer_fp8.topk_recall(fp8_step()[2].long(), bf16_step()[2].long())
    row = {"B": bsz, "L": length, "fp8_vs_bf16_selection_recall": recall}
    for name, fn in (("bf16", bf16_step), ("fp8", fp8_step), ("dense", dense_step)):
        row[f"{name}_eager_ms"] = median_ms(fn, reps=50, warmup=5)
        row[f"{name}_graph_ms"] = graph_replay_ms(fn)
    for mode in ("eager", "graph"):
        row[f"fp8_vs_bf16_{mode}"] = row[f"fp8_{mode}_ms"] / row[f"bf16_{mode}_ms"]
        row[f"fp8_vs_dense_{mode}"] = row[f"fp8_{mode}_ms"] / row[f"dense_{mode}_ms"]
        row[f"bf16_vs_dense_{mode}"] = row[f"bf16_{mode}_ms"] / row[f"dense_{mode}_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="4,8")
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        for n in (int(x) for x in a.lens.split(",")):
            rows.append(one_size(b, n))
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                flush=True,
            )
            torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
