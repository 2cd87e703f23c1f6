"""Video-RL recipes scored on a LARGE held-out grounding set: does RL from the default SFT checkpoint move
held-out TimeLens mIoU at all, once the set is big enough to tell?

Why: the default eval has 33 held-out grounding queries, and a per-query IoU difference has a standard deviation of
~15-17 points, so gains of +2 to +4 on it were indistinguishable from noise (bench/RESULTS.md `## video_rl sweep`).
This bench regenerates the default pipeline's synthetic videos from its config (same seed: identical specs), adds
`--extra-heldout` new held-out videos of the same generator (indices after the set's own, split heldout) and
`--fresh-train` new training-split videos (an RL prompt pool SFT never saw), then runs each recipe of a grid from the
SFT checkpoint (the library's own `train_video_rl`, one CPU thread per process) and scores every checkpoint on the
extra held-out whole-clip queries, asked exactly as the eval asks them (keye.rl.prompt_sets -> keye.eval.prompts),
greedy, IoU against the exact span. Paired sign-flip test against the SFT checkpoint.

  python bench/video_rl_heldout.py --sft WS/checkpoints/<sft>/final --grid grid.json --out OUT [--device cpu]
grid.json: {"name": {overrides}}, overrides among: lr, steps, seed, scale_rewards, temperature, G (group size),
P (prompts per step), kl, windows, ctx_off (Context-RL off), unfreeze (ViT + projector train), fresh (prompts from
the fresh training videos), or {"checkpoint": DIR} to score a trained checkpoint as it is; the name "sft" scores the
SFT checkpoint itself (needed for the paired test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def _encode(args: tuple) -> None:
    from keye.datasets.synthetic.render import encode_video

    spec, out = args
    if not (Path(out) / spec.filename).exists():
        encode_video(spec, Path(out) / spec.filename)


def generate(config: str, root: Path, extra: int, fresh: int, workers: int) -> None:
    """<root>/set (the pipeline's synthetic source), <root>/extra (held-out), <root>/fresh (train split)."""
    from keye.core.config import load_config
    from keye.datasets.synthetic.annotate import annotations
    from keye.datasets.synthetic.dataset import dataset_specs
    from keye.datasets.synthetic.spec import make_spec

    src = next(s for s in load_config(config).sources if s.kind == "synthetic")
    kw = {"max_objects": src.max_objects, "color_changes": src.color_changes}
    base = dataset_specs(src.n_videos, src.n_long, src.seed, src.heldout_fraction, **kw)
    first = src.n_videos
    sets = {
        "set": base,
        "extra": [make_spec(i, src.seed, split="heldout", **kw) for i in range(first, first + extra)],
        "fresh": [
            make_spec(i, src.seed, split="train", **kw) for i in range(first + extra, first + extra + fresh)
        ],
    }
    jobs = []
    for name, specs in sets.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for s in specs:
            (d / f"{s.name}.json").write_text(json.dumps(annotations(s), indent=1) + "\n")
            jobs.append((s, str(d)))
    jobs.sort(key=lambda a: -a[0].n_frames * a[0].width * a[0].height)  # longest first
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_encode, jobs, chunksize=4))


def videos(root: Path, name: str) -> list[str]:
    return sorted(str(v) for v in (root / name).iterdir() if v.suffix in SUFFIXES)


def score_heldout(checkpoint: Path, root: Path, device: str, work: Path, samples: int = 0) -> list[float]:
    """100 x IoU per extra held-out query, greedy, 24 new tokens (the eval stage's settings); samples > 0: the mean
    IoU of that many answers sampled at temperature 1.0 instead (one seeded generator per answer)."""
    import torch

    from keye.eval.metrics import temporal_iou
    from keye.eval.parsing import parse_span
    from keye.model.generate import Prompt
    from keye.model.generate import generate as gen
    from keye.rl.prompt_sets import split_prompts
    from keye.serve.chat import ChatModel

    held = split_prompts(videos(root, "extra"), work, "heldout", grounding_windows=0)
    chat = ChatModel.from_checkpoint(checkpoint, device=device)
    out: list[float] = []
    for a in range(0, len(held), 64):
        batch = held[a : a + 64]
        prompts = [chat.build_prompt(p.messages) for p in batch]
        if samples:
            prompts = [
                Prompt(
                    p.input_ids,
                    p.pixel_patches,
                    p.patch_grids,
                    generator=torch.Generator().manual_seed(i * 64 + k),
                )
                for i, p in enumerate(prompts, start=a)
                for k in range(samples)
            ]
        results = gen(
            chat.model, prompts, max_new_tokens=24, temperature=1.0 if samples else 0.0,
            eos_token_ids=chat.eos_ids, decode=chat.decode,
        )  # fmt: skip
        per = max(1, samples)
        for i, p in enumerate(batch):
            ious = [
                temporal_iou(parse_span(r.text), tuple(p.reference["span"]))
                for r in results[i * per : (i + 1) * per]
            ]
            out.append(100 * sum(ious) / per)
    return out


def run_one(args: tuple) -> tuple[str, dict]:
    name, over, sft, root, config, device, samples = args
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    work = Path(f"/tmp/video_rl_heldout/{name}")
    shutil.rmtree(work, ignore_errors=True)
    if name == "sft" or "checkpoint" in over:  # score a checkpoint as it is
        ck = Path(over.get("checkpoint", sft))
        r = {"iou": score_heldout(ck, root, device, work / "p"), "over": over, "rl_seconds": 0.0, "curve": []}
        if samples:
            r["iou_sampled"] = score_heldout(ck, root, device, work / "s", samples)
        return name, {**r, "seconds": time.time() - t0}
    from keye.core.config import load_config
    from keye.rl.prompt_sets import split_prompts
    from keye.rl.video_rl import VideoRLSchedule, train_video_rl
    from keye.stages.video_rl_settings import grpo_settings

    s = load_config(config).video_rl
    s = s.model_copy(
        update={
            "lr": over.get("lr", s.lr),
            "steps": over.get("steps", s.steps),
            "scale_rewards": over.get("scale_rewards", s.scale_rewards),
            "temperature": over.get("temperature", s.temperature),
            "group_size": over.get("G", s.group_size),
            "prompts_per_step": over.get("P", s.prompts_per_step),
            "kl_coef": over.get("kl", s.kl_coef),
            "grounding_windows": over.get("windows", s.grounding_windows),
            "context_rl": s.context_rl.model_copy(
                update={"enabled": s.context_rl.enabled and not over.get("ctx_off")}
            ),
        }
    )
    pool = videos(root, "fresh" if over.get("fresh") else "set")
    prompts = split_prompts(
        pool, work / "train", "train", kinds=s.tasks, grounding_windows=s.grounding_windows
    )
    schedule = VideoRLSchedule(
        steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, prompts_per_step=s.prompts_per_step,
        save_every=10**9, seed=over.get("seed", 0), freeze_vision=not over.get("unfreeze"),
    )  # fmt: skip
    curve: list[float] = []
    res = train_video_rl(
        sft, prompts, work / "run", schedule, grpo_settings(s), s.rewards, device=device,
        log_metrics=lambda m, step: curve.append(round(float(m.get("reward_mean", 0.0)), 3)),
    )  # fmt: skip
    t1 = time.time()
    ious = score_heldout(res.checkpoint_dir, root, device, work / "p")
    shutil.rmtree(work, ignore_errors=True)
    return name, {
        "iou": ious,
        "over": over,
        "rl_seconds": t1 - t0,
        "eval_seconds": time.time() - t1,
        "curve": curve,
    }


def sign_flip_p(d: list[float], n: int = 20000, seed: int = 0) -> float:
    """One-sided: the share of random sign flips whose mean is at least the observed mean."""
    import numpy as np

    x = np.asarray(d)
    flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, len(x)))
    return float(((flips * x).mean(1) >= x.mean()).mean())


def summary(results: dict[str, dict]) -> list[str]:
    import numpy as np

    if "sft" not in results:
        return ["no 'sft' result: nothing to pair against"]
    s = np.array(results["sft"]["iou"])
    lines = [f"sft: mIoU {s.mean():.2f} on {len(s)} held-out queries"]
    for name, r in sorted(results.items()):
        if name == "sft":
            continue
        d = np.array(r["iou"]) - s
        lines.append(
            f"{name}: {np.mean(r['iou']):.2f} ({d.mean():+.2f}, sd {d.std():.1f}, better {(d > 0).sum()} worse "
            f"{(d < 0).sum()}, one-sided p {sign_flip_p(list(d)):.4f}) rl {r['rl_seconds']:.0f} s, "
            f"reward {r['curve'][:1]} .. {r['curve'][-3:]}"
        )
    if "iou_sampled" in results["sft"]:
        lines.append(
            "sampled at T=1, mean IoU per query: "
            + ", ".join(
                f"{n} {np.mean(r['iou_sampled']):.2f}"
                for n, r in sorted(results.items())
                if "iou_sampled" in r
            )
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", required=True, help="the SFT checkpoint directory (a workspace's .../final)")
    ap.add_argument("--grid", required=True, help="JSON {name: overrides}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REPO / "pipelines.yaml"))
    ap.add_argument("--videos", default="/tmp/video_rl_heldout_videos")
    ap.add_argument("--extra-heldout", type=int, default=200)
    ap.add_argument("--fresh-train", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: report what finished by then")
    ap.add_argument("--sampled", type=int, default=0, help="also score K answers sampled at T=1 per query")
    a = ap.parse_args()
    t0 = time.time()
    out, root = Path(a.out), Path(a.videos)
    out.mkdir(parents=True, exist_ok=True)
    generate(a.config, root, a.extra_heldout, a.fresh_train, a.workers)
    print(f"videos in {time.time() - t0:.0f} s", flush=True)
    grid = json.loads(Path(a.grid).read_text())
    results: dict[str, dict] = {}
    ex = ProcessPoolExecutor(a.workers)
    futures = [
        ex.submit(run_one, (n, o, a.sft, root, a.config, a.device, a.sampled)) for n, o in grid.items()
    ]
    try:
        for f in as_completed(futures, timeout=max(1.0, t0 + a.budget - time.time())):
            name, r = f.result()
            results[name] = r
            (out / "results.json").write_text(json.dumps(results))
            print(f"done {name} at {time.time() - t0:.0f} s", flush=True)
    except TimeoutError:
        print(f"budget reached: {len(results)} of {len(grid)} finished", flush=True)
    print("\n".join(summary(results)), flush=True)
    for p in list(getattr(ex, "_processes", {}).values()):  # unfinished workers must not outlive the budget
        p.kill()
    ex.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
