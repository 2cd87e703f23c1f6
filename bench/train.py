"""Training-step benchmark: (1) the `small` preset at 256K packed context with DSA sparse attention, (2) a slice of
the 30B-A3B shape (real widths, a few layers) at 32K context, dense attention, bf16. Synthetic random token packs;
AdamW steps through the model's packed forward. Reports tokens/s, peak memory, MFU (keye.train.metrics: sparse
attention counted as sparse, recomputation not counted) and the bf16 matmul rate measured in the same run.

  python bench/train.py --out OUT_DIR                 # both runs on CUDA
  python bench/train.py --out OUT_DIR --cpu-smoke     # tiny shapes on CPU (checks the script, no timing value)
  python bench/train.py --out OUT_DIR --long 65536,131072,262144 [--long-modes dense,dsa,dsa-block] [--steps N]
      # the small preset at each context length, dense (SDPA) vs DSA token vs DSA block-shared, in one run

Dense attention: keye.kernels.dispatch has no Triton dense-attention kernel (its reference materialises
query-block x L score slabs); `--sdpa` (default on CUDA) routes dense attention through torch SDPA (FlashAttention-2
backend) per sample for this benchmark and records that it did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:  # checkpoint io is not used here; a bare GPU box may lack safetensors
    import safetensors  # noqa: F401
except ImportError:  # pragma: no cover
    _st = types.ModuleType("safetensors")
    _st.safe_open = None  # type: ignore[attr-defined]
    _stt = types.ModuleType("safetensors.torch")
    _stt.save_file = None  # type: ignore[attr-defined]
    _stt.load_file = None  # type: ignore[attr-defined]
    sys.modules["safetensors"], sys.modules["safetensors.torch"] = _st, _stt

from keye.kernels import dispatch  # noqa: E402
from keye.model import build_model, preset  # noqa: E402
from keye.train.metrics import H200_BF16_PEAK, mfu, training_flops  # noqa: E402

RESULTS: list[dict] = []
OUT_FILE: list[str] = []


def log(**row: object) -> None:
    """Print a result row and rewrite the JSON file (so a timeout keeps the rows already measured)."""
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if OUT_FILE:
        with open(OUT_FILE[0], "w") as f:
            json.dump(RESULTS, f, indent=2)


def sdpa_dense_attention(q, k, v, cu_seqlens, scale, block=1024):  # same signature as the reference
    """Causal GQA attention per sample through torch SDPA; returns (o, None): the model uses o only."""
    outs = []
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs), None


def matmul_rate(device: str, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run_case(
    name: str,
    cfg_name: str,
    lengths: list[int],
    steps: int,
    device: str,
    dtype: torch.dtype,
    mode: str,
    layers: int | None,
    vocab: int,
    ckpt: bool,
    matmul: float | None,
    selection: str = "token",
    fsdp: bool = False,
) -> None:
    cfg = preset(cfg_name, vocab_size=vocab)
    cfg.lm.dsa.selection = selection
    if layers is not None:
        cfg.lm.num_layers = layers
    cfg.vision.num_layers = 1  # text-only packs: the ViT is not run
    cfg.set_attention_mode(mode)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype)
    model.set_gradient_checkpointing(ckpt)
    model.train()
    if fsdp:  # FSDP2 wrapping as the trainer applies it (keye.train.fsdp), on a 1-rank mesh: its cost alone
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from keye.train.fsdp import shard_model

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29555")
            dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
        shard_model(model, init_device_mesh(device, (1,)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    t = sum(lengths)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab - 1, (t,), generator=g).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    labels = ids.clone()
    flops = training_flops(cfg.lm, lengths)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, cu_seqlens=cu, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        times.append(dt)
        print(f"{name} step {step}: {dt:.3f} s loss {float(out.loss.detach()):.4f}", flush=True)
    steady = times[1:] if len(times) > 1 else times
    sec = sum(steady) / len(steady)
    row = {
        "case": name,
        "preset": cfg_name,
        "layers": cfg.lm.num_layers,
        "attention": mode,
        "dsa_selection": selection if mode != "dense" else None,
        "seq_lengths": lengths,
        "tokens": t,
        "dtype": str(dtype),
        "grad_checkpointing": ckpt,
        "fsdp2": fsdp,
        "step_s": round(sec, 4),
        "step_times_s": [round(x, 4) for x in times],
        "tokens_per_s": round(t / sec, 1),
        "model_tflop_per_step": round(flops / 1e12, 3),
        "tflop_s": round(flops / sec / 1e12, 1),
        "loss_last": round(float(out.loss.detach()), 4),
        "kernels": {
            n: dispatch.backend_name(n, ids.float())
            for n in ("indexer_topk", "sparse_attention", "indexer_kl", "moe_experts", "block_topk")
        },
        "dense_attention": "sdpa" if dispatch.dense_attention is sdpa_dense_attention else "dispatch",
    }
    if device == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["mfu_vs_989_peak"] = round(mfu(flops, sec, H200_BF16_PEAK), 4)
        if matmul:
            row["of_measured_matmul_rate"] = round(flops / sec / matmul, 4)
    log(**row)
    del model, opt, out
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", choices=["small256k", "slice30b"], default=None)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--slice-layers", type=int, default=4)
    ap.add_argument("--small-lengths", default="65536,65536,65536,65536")
    ap.add_argument(
        "--long",
        default="",
        help="comma list of context lengths (one sequence each): the small preset's step in every --long-modes mode",
    )
    ap.add_argument("--long-modes", default="dense,dsa,dsa-block")
    ap.add_argument(
        "--fsdp", action="store_true", help="slice30b: also the same step under FSDP2 wrapping (1 rank)"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    OUT_FILE.append(os.path.join(args.out, "train_bench.json"))
    if args.cpu_smoke:
        os.environ.setdefault("KEYE_KERNELS", "reference")
        dispatch.dense_attention = sdpa_dense_attention
        run_case("small_dsa_smoke", "tiny", [300, 200], 2, "cpu", torch.float32, "dsa", 2, 512, True, None)
        run_case(
            "small_dsa_block_smoke",
            "tiny",
            [300, 200],
            2,
            "cpu",
            torch.float32,
            "dsa",
            2,
            512,
            True,
            None,
            "block",
        )
        run_case("slice_smoke", "tiny", [256], 2, "cpu", torch.float32, "dense", 2, 512, False, None)
        if args.fsdp:
            run_case(
                "slice_smoke_fsdp2",
                "tiny",
                [256],
                2,
                "cpu",
                torch.float32,
                "dense",
                2,
                512,
                False,
                None,
                fsdp=True,
            )
    else:
        if not args.no_sdpa:
            dispatch.dense_attention = sdpa_dense_attention
        rate = matmul_rate("cuda")
        log(
            case="baseline",
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            bf16_matmul_8192_tflop_s=round(rate / 1e12, 1),
        )
        for length in [int(x) for x in args.long.split(",") if x]:
            for m in args.long_modes.split(","):
                name = f"small_{length // 1024}k_{m}"
                try:
                    run_case(name, "small", [length], args.steps, "cuda", torch.bfloat16, m.split("-")[0], None,
                             151936, True, rate, "block" if m == "dsa-block" else "token")  # fmt: skip
                except Exception as e:  # record and go on to the next case
                    log(case=name, error=f"{type(e).__name__}: {e}")
                    torch.cuda.empty_cache()
        if args.long:
            return
        if args.only in (None, "slice30b"):
            try:
                run_case(
                    "slice30b_32k",
                    "30b-a3b",
                    [32768],
                    args.steps,
                    "cuda",
                    torch.bfloat16,
                    "dense",
                    args.slice_layers,
                    151936,
                    False,
                    rate,
                )
            except Exception as e:  # record and go on to the next case
                log(case="slice30b_32k", error=f"{type(e).__name__}: {e}")
                torch.cuda.empty_cache()
            if args.fsdp:
                try:
                    run_case("slice30b_32k_fsdp2", "30b-a3b", [32768], args.steps, "cuda", torch.bfloat16, "dense",
                             args.slice_layers, 151936, False, rate, fsdp=True)  # fmt: skip
                except Exception as e:  # record and go on
                    log(case="slice30b_32k_fsdp2", error=f"{type(e).__name__}: {e}")
                    torch.cuda.empty_cache()
        if args.only in (None, "small256k"):
            lengths = [int(x) for x in args.small_lengths.split(",")]
            try:
                run_case(
                    "small_256k_dsa",
                    "small",
                    lengths,
                    args.steps,
                    "cuda",
                    torch.bfloat16,
                    "dsa",
                    None,
                    151936,
                    True,
                    rate,
                )
            except Exception as e:
                log(case="small_256k_dsa", error=f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
