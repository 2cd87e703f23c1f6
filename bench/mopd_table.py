"""Issue #18's table: does one MOPD student keep every specialist's skill, and forget less than sequential training?

From the SFT checkpoint of a trained default-pipeline workspace (read-only; its checkpoint and videos are read in
place), with one fixed budget of updates per run:
  specialist:<d>  outcome RL on domain d only (grounding: time_r1, mcq: mcq, caption: caption_f1)
  sequential      grounding RL, then MCQ RL on the same model (the forgetting baseline)
  mopd            the SFT student distilled from the three specialists, each prompt by its domain's teacher
Each checkpoint answers the held-out benchmarks with the eval stage's code (keye.eval.heldout.run_benchmarks over
keye_predict_fn): grounding mIoU (TimeLens layout), MCQ accuracy (Video-MME layout), and a caption score (word F1 of
"Describe the video." against the held-out sidecar captions; chance: the F1 of another video's caption).

  python bench/mopd_table.py --base /work/runs/base --out /tmp/mopd_table --steps 30

Writes <out>/table.json and <out>/table.md (paste into bench/RESULTS.md with the date, machine and command).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from keye.core.lineage import Lineage
from keye.data.prompts import CAPTION_PROMPT
from keye.eval.heldout import heldout_benchmarks, run_benchmarks
from keye.eval.predict import keye_predict_fn
from keye.rl.mopd import MOPDSettings
from keye.rl.mopd_prompts import domain_prompts
from keye.rl.mopd_train import MOPDSchedule, TeacherSpec, train_mopd
from keye.rl.rewards import caption_f1

REWARDS = {"grounding": "time_r1", "mcq": "mcq", "caption": "caption_f1"}
DOMAINS = tuple(REWARDS)


def sft_checkpoint(base: Path) -> str:
    rows = Lineage(base, read_only=True).query(
        "SELECT path FROM checkpoints WHERE stage = 'sft' ORDER BY created_at DESC LIMIT 1"
    )
    if not rows:
        raise SystemExit(f"{base}: no sft checkpoint in lineage (run the default pipeline first)")
    return rows[0]["path"]


def caption_scores(predict, videos: list[str]) -> tuple[float, float]:
    """(mean word F1 of the model's captions, chance: mean F1 of the next video's caption), in percent."""
    held = [
        v for v in videos if json.loads(Path(v).with_suffix(".json").read_text()).get("split") == "heldout"
    ]
    refs = [json.loads(Path(v).with_suffix(".json").read_text())["caption"] for v in held]
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": v}, {"type": "text", "text": CAPTION_PROMPT}],
            }
        ]
        for v in held
    ]
    answers = predict.chat(chats)
    score = sum(caption_f1(a, {"caption": r}) for a, r in zip(answers, refs, strict=True)) / len(refs)
    chance = sum(caption_f1(refs[(i + 1) % len(refs)], {"caption": r}) for i, r in enumerate(refs)) / len(
        refs
    )
    return 100 * score, 100 * chance


def evaluate(ckpt: str, videos: list[str], out: Path, args: argparse.Namespace) -> dict[str, float]:
    predict = keye_predict_fn(ckpt, device=args.device, max_new_tokens=24)
    sets = heldout_benchmarks(videos, out / "benchmarks", split="heldout")
    res = run_benchmarks(predict, sets, out, args.batch, args.limit)
    cap, cap_chance = caption_scores(predict, videos)
    return {
        "grounding": res["timelens"]["mIoU"],
        "grounding_chance": res["timelens"]["chance"]["mIoU"],
        "mcq": res["videomme"]["accuracy"],
        "mcq_chance": res["videomme"]["chance"]["accuracy"],
        "caption": cap,
        "caption_chance": cap_chance,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("/work/runs/base"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30, help="updates per run (the fixed budget)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts", type=int, default=6, help="prompts per update")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24, help="max new tokens per rollout")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--limit", type=int, default=None, help="questions per benchmark")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out
    sft = sft_checkpoint(args.base)
    videos = sorted(str(p) for p in (args.base / "videos").rglob("*.mp4") if p.with_suffix(".json").is_file())
    prompts = domain_prompts(videos, out / "prompts", "train", kinds=["timelens", "videomme"], captions=True)
    by = {d: [p for p in prompts if p.reference["domain"] == d] for d in DOMAINS}
    sched = MOPDSchedule(steps=args.steps, lr=args.lr, prompts_per_step=args.prompts, save_every=args.steps)

    def rl(d: str, init: str, name: str) -> str:
        s = MOPDSettings(
            group_size=args.group, max_new_tokens=args.tokens, loss_agg_mode="token-mean", domains=(d,)
        )
        r = train_mopd(init, {}, by[d], out / name, sched, s, {d: REWARDS[d]}, device=args.device)
        return str(r.checkpoint_dir)

    ckpts, seconds = {"sft": sft}, {}
    for d in DOMAINS:
        t0 = time.perf_counter()
        ckpts[f"specialist:{d}"] = rl(d, sft, f"specialist-{d}")
        seconds[f"specialist:{d}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpts["sequential"] = rl("mcq", ckpts["specialist:grounding"], "sequential-mcq")
    seconds["sequential"] = time.perf_counter() - t0 + seconds["specialist:grounding"]
    t0 = time.perf_counter()
    teachers = {d: TeacherSpec(checkpoint=ckpts[f"specialist:{d}"]) for d in DOMAINS}
    s = MOPDSettings(group_size=args.group, max_new_tokens=args.tokens, alpha=args.alpha, domains=DOMAINS)
    ckpts["mopd"] = str(
        train_mopd(sft, teachers, prompts, out / "mopd", sched, s, REWARDS, device=args.device).checkpoint_dir
    )
    seconds["mopd"] = time.perf_counter() - t0

    table = {
        name: evaluate(ck, videos, out / "eval" / name.replace(":", "-"), args) for name, ck in ckpts.items()
    }
    rel = {n: {d: row[d] - row[f"{d}_chance"] for d in DOMAINS} for n, row in table.items()}
    checks = {}
    for d in DOMAINS:
        spec = rel[f"specialist:{d}"][d]
        checks[d] = {
            "mopd_over_chance": rel["mopd"][d],
            "specialist_over_chance": spec,
            "ratio": rel["mopd"][d] / spec if spec > 0 else None,
            "meets_95": bool(spec > 0 and rel["mopd"][d] >= 0.95 * spec),
        }
    forgetting = {
        "grounding_sequential": rel["sequential"]["grounding"],
        "grounding_mopd": rel["mopd"]["grounding"],
    }
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "prompts": {d: len(v) for d, v in by.items()},
        "table": table,
        "over_chance": rel,
        "checks": checks,
        "forgetting": forgetting,
        "train_seconds": seconds,
        "checkpoints": ckpts,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(result, indent=1))
    lines = [
        "| checkpoint | grounding mIoU (chance) | MCQ acc (chance) | caption F1 (chance) |",
        "|---|---|---|---|",
    ]
    for n, row in table.items():
        cells = [f"{row[d]:.1f} ({row[f'{d}_chance']:.1f})" for d in DOMAINS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "MOPD vs specialist, over chance: "
        + ", ".join(
            f"{d} {c['mopd_over_chance']:.1f} / {c['specialist_over_chance']:.1f} ({'meets' if c['meets_95'] else 'misses'} 95%)"
            for d, c in checks.items()
        ),
    ]
    lines += [
        f"Grounding over chance after sequential {forgetting['grounding_sequential']:.1f}, after MOPD "
        f"{forgetting['grounding_mopd']:.1f}"
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
