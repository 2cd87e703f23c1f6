"""bench/rollout: RL rollout throughput (generated tokens per second) of the `local` engine's generation
(keye.model.generate: packed prefill + KV-cache decode, per-token logprobs) against Hugging Face transformers
`generate` on the SAME language model, in the same run.

HF transformers cannot load our VLM (no HF class for Keye's ViT + projector + M-RoPE LM), so the comparison is on the
language model: a random-init transformers Qwen3MoeForCausalLM of the preset's LM shape is saved and converted with
`keye.model.convert.convert_hf` into our checkpoint, so both sides hold identical LM weights (a greedy parity check
on a few prompts is printed). Text positions are equal on the three M-RoPE axes, where M-RoPE is plain RoPE.
Workload: --prompts prompts of 16..64 random tokens (seeded), --group samples each (every prompt repeated G times,
as a GRPO group), exactly --new-tokens new tokens per sample (no eos), temperature 1.0, top-p 1.0 (HF top_k off).
With --frames K the local engine also runs the same prompts each with K frames of 16 visual tokens (no HF baseline).

    python bench/rollout.py                                   # CPU, tiny preset, 8 prompts x G=4, 32 new tokens
    python bench/rollout.py --device cuda --preset small --prompts 64 --group 8 --new-tokens 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from keye.model import load_checkpoint, preset
from keye.model.convert import convert_hf
from keye.model.generate import Prompt, generate


def hf_model(preset_name: str, vocab: int, seed: int, out: Path):
    import transformers

    lm = preset(preset_name, vocab_size=vocab).lm
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=lm.hidden_size,
        intermediate_size=4 * lm.hidden_size,
        moe_intermediate_size=lm.moe_intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_kv_heads,
        head_dim=lm.head_dim,
        num_experts=lm.num_experts,
        num_experts_per_tok=lm.top_k,
        norm_topk_prob=lm.norm_topk_prob,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        rms_norm_eps=lm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # weights with some spread, so sampling is not uniform noise
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_keye(model, prompts, group, new_tokens, device, frames=0) -> tuple[float, int]:
    items = []
    for ids in prompts:
        p = Prompt(input_ids=ids)
        if frames:
            v = model.config.vision
            grid = torch.tensor(
                [[1, 8, 8]] * frames, dtype=torch.int32
            )  # 8x8 patches -> 16 visual tokens each
            n_vis = frames * 16
            ids = torch.cat([torch.full((n_vis,), model.config.image_token_id), ids])
            patches = torch.randn(
                frames * 64, 3 * v.patch_size**2, generator=torch.Generator().manual_seed(0)
            )
            p = Prompt(input_ids=ids, pixel_patches=patches.to(model.dtype), patch_grids=grid)
        items += [p] * group
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    res = generate(model, items, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, generator=gen)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, sum(len(r.token_ids) for r in res)


def bench_hf(model, prompts, group, new_tokens, device) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    rows, masks = [], []
    for p in prompts:
        pad = width - len(p)
        for _ in range(group):
            rows.append(torch.cat([torch.zeros(pad, dtype=torch.long), p]))
            masks.append(
                torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
            )
    ids, mask = torch.stack(rows).to(device), torch.stack(masks).to(device)
    torch.manual_seed(0)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, int((out.shape[1] - width) * out.shape[0])


def parity(keye_model, hf, prompts, device, n=4, tokens=8) -> float:
    """Share of greedy tokens on which both models agree (one prompt at a time, no padding)."""
    agree = total = 0
    for p in prompts[:n]:
        ours = generate(keye_model, [p], max_new_tokens=tokens, temperature=0.0)[0].token_ids
        with torch.no_grad():
            ref = hf.generate(
                input_ids=p[None].to(device),
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=0,
                eos_token_id=None,
            )[0, len(p) :].tolist()
        agree += sum(a == b for a, b in zip(ours, ref, strict=True))
        total += tokens
    return agree / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument(
        "--frames", type=int, default=0, help="also time local generation with K frames per prompt"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per engine after one warm-up (best kept)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    g = torch.Generator().manual_seed(args.seed)
    prompts = [
        torch.randint(1, args.vocab - 1, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g)
        for _ in range(args.prompts)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(args.preset, args.vocab, args.seed, Path(tmp) / "hf")
        ckpt = convert_hf(
            Path(tmp) / "hf",
            Path(tmp) / "keye",
            image_token_id=args.vocab - 1,
            vision=preset(args.preset).vision,
        )
        ours = load_checkpoint(ckpt, device=args.device, dtype=dtype).eval()
    hf = hf.to(args.device, dtype)
    agree = parity(ours, hf, prompts, args.device)
    rows = []
    engines = [
        (
            "keye local (generate)",
            lambda: bench_keye(ours, prompts, args.group, args.new_tokens, args.device),
        ),
        ("HF transformers generate", lambda: bench_hf(hf, prompts, args.group, args.new_tokens, args.device)),
    ]
    if args.frames:
        engines.append(
            (
                f"keye local, {args.frames} frames/prompt",
                lambda: bench_keye(ours, prompts, args.group, args.new_tokens, args.device, args.frames),
            )
        )
    for _, fn in engines:
        fn()  # warm-up (allocator, kernels)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in engines}
    for _ in range(args.repeats):  # engines interleaved, so load from other jobs hits them alike
        for name, fn in engines:
            runs[name].append(fn())
    for name, _ in engines:
        wall = min(r[0] for r in runs[name])
        cpu = min(r[1] for r in runs[name])
        n = runs[name][0][2]
        rows.append((name, n, wall, cpu, n / wall, n / cpu))
    dev = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(
        f"date {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC  device {args.device} ({dev}, {os.cpu_count()} cpus, "
        f"torch threads {torch.get_num_threads()})  preset {args.preset}  vocab {args.vocab}  dtype {dtype}"
    )
    print(
        f"workload: {args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens each; "
        f"greedy parity keye vs HF: {agree:.0%} of {min(4, len(prompts)) * 8} tokens"
    )
    print("| engine | tokens | wall s (best) | tokens/s (wall) | CPU s (best) | tokens per CPU-s |")
    print("|---|---|---|---|---|---|")
    for name, n, wall, cpu, tps, tpc in rows:
        print(f"| {name} | {n} | {wall:.2f} | {tps:.1f} | {cpu:.2f} | {tpc:.1f} |")
    print(
        f"keye local / HF generate: {rows[0][4] / rows[1][4]:.2f}x by wall time, "
        f"{rows[0][5] / rows[1][5]:.2f}x by CPU time"
    )


if __name__ == "__main__":
    main()
