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

The eval's own held-out split (33 grounding queries on the default set) cannot tell a +1-2 point difference from
noise; `--extra-heldout N` scores on N new held-out videos of the base pipeline's generator instead (indices after
the set's own, as bench/video_rl_heldout.py makes them), `--mcq-limit` caps the MCQs and captions asked there.
`--grounding video_rl` trains the grounding specialist with the `video_rl` stage's recipe (the config's section:
whole-clip prompts, keye.rl.video_rl) instead of the fixed-budget outcome RL below.

Writes <out>/table.json and <out>/table.md (paste into bench/RESULTS.md with the date, machine and command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from keye.core.lineage import Lineage
from keye.eval.domain_table import score_domains
from keye.eval.heldout import paired_grounding
from keye.rl.mopd import MOPDSettings
from keye.rl.mopd_prompts import domain_prompts
from keye.rl.mopd_train import MOPDSchedule, TeacherSpec, train_mopd

REPO = Path(__file__).resolve().parents[1]
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
REWARDS = {"grounding": "time_r1", "mcq": "mcq", "caption": "caption_f1"}
DOMAINS = tuple(REWARDS)


def sft_checkpoint(base: Path) -> str:
    rows = Lineage(base, read_only=True).query(
        "SELECT path FROM checkpoints WHERE stage = 'sft' ORDER BY created_at DESC LIMIT 1"
    )
    if not rows:
        raise SystemExit(f"{base}: no sft checkpoint in lineage (run the default pipeline first)")
    return rows[0]["path"]


def evaluate(ckpt: str, videos: list[str], out: Path, args: argparse.Namespace) -> dict:
    """Grounding on every held-out query; MCQs (Video-MME layout) and captions up to --mcq-limit."""
    torch.set_num_threads(1)
    return score_domains(ckpt, videos, out, device=args.device, batch_size=args.batch, limit=args.mcq_limit)


def _evaluate_job(job: tuple) -> tuple[str, dict[str, float]]:
    """One row, reused from <out>/row.json when the same checkpoint (by content) was scored on the same videos."""
    from keye.core.hashing import hash_checkpoint_dir

    name, ck, videos, out, args = job
    key = {"sha256": hash_checkpoint_dir(Path(ck)), "videos": list(videos), "limit": args.mcq_limit}
    cache = Path(out) / "row.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return name, saved["row"]
    row = evaluate(ck, videos, out, args)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "row": row}))
    tmp.replace(cache)
    return name, row


def heldout_videos(args: argparse.Namespace) -> list[str] | None:
    """--extra-heldout new held-out videos of the base pipeline's generator (None: the base's own split)."""
    if not args.extra_heldout:
        return None
    sys.path.insert(0, str(REPO / "bench"))
    from video_rl_heldout import generate, videos

    generate(args.config, args.videos, args.extra_heldout, 0, args.workers)
    return videos(args.videos, "extra")


def sft_specialist(init: str, domain: str, out: Path, args: argparse.Namespace) -> str:
    """A teacher trained by SFT on its domain only (the issue's other way to make one): the train stage's trainer
    on the base workspace's PackSet, from the SFT checkpoint, with loss only on the domain's pack tasks. The
    domain-only pack index is cached beside the PackSet, as the train stage caches it."""
    from keye.core.config import SpecialistDomain, SpecialistsSettings, load_config
    from keye.core.lineage import Lineage
    from keye.data.tokenizer import load_tokenizer
    from keye.stages.pack import shard_map, task_pack_index
    from keye.stages.specialists import sft_recipe
    from keye.train import train_stage

    cfg = load_config(args.config)
    lineage = Lineage(args.base, read_only=True)
    packset_id = lineage.latest_artifact("packset")
    tok_dir = Path(json.loads(lineage.artifact(packset_id)["meta"] or "{}")["tokenizer_dir"])
    tok = load_tokenizer(tok_dir)
    shards = shard_map(lineage, lineage.input_of_kind(packset_id, "shardset"))
    spec = SpecialistsSettings(
        sft_steps=args.sft_steps, sft_lr=args.sft_lr, sft_tokens_per_step=4096,
        domains={domain: SpecialistDomain(kinds=[], rewards={}, method="sft")},  # the pack task of its name
    )  # fmt: skip
    recipe = sft_recipe(spec, domain)  # the specialists stage's own recipe for a method-sft teacher
    pack_index = task_pack_index(
        args.base / "packs" / packset_id, recipe.tasks(), shards, tok, cfg.sampling, cfg.pack
    )
    res = train_stage(
        recipe, init_checkpoint=init, model_preset=cfg.train.preset, vocab_size=len(tok),
        image_token_id=tok.image_id, pack_index=pack_index, shards=shards, tokenizer_dir=tok_dir,
        policy=cfg.sampling, out_dir=out, device=args.device,
    )  # fmt: skip
    return str(res.checkpoint_dir)


def video_rl_specialist(init: str, train_videos: list[str], out: Path, args: argparse.Namespace) -> str:
    """The grounding teacher as the `video_rl` stage trains it (the config's section)."""
    from keye.core.config import load_config
    from keye.rl.prompt_sets import split_prompts
    from keye.rl.video_rl import VideoRLSchedule, train_video_rl
    from keye.stages.video_rl_settings import grpo_settings

    cfg = load_config(args.config)
    s = cfg.video_rl
    prompts = split_prompts(
        train_videos, out / "prompts", "train", kinds=s.tasks, grounding_windows=s.grounding_windows
    )
    schedule = VideoRLSchedule(
        steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, prompts_per_step=s.prompts_per_step,
        save_every=s.save_every, seed=cfg.seed, freeze_vision=s.freeze_vision,
    )  # fmt: skip
    res = train_video_rl(
        init, prompts, out / "run", schedule, grpo_settings(s), s.rewards, device=args.device
    )
    return str(res.checkpoint_dir)


def _shares(text: str) -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in (x.split("=") for x in text.split(",") if x)]


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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--config", default=str(REPO / "pipelines.yaml"), help="the base workspace's pipeline file"
    )
    ap.add_argument(
        "--extra-heldout", type=int, default=0, help="score on N new held-out videos (0: the base's)"
    )
    ap.add_argument("--videos", type=Path, default=Path("/tmp/mopd_table_videos"))
    ap.add_argument("--mcq-limit", type=int, default=None, help="MCQs and captions asked per checkpoint")
    ap.add_argument("--grounding", choices=("outcome", "video_rl"), default="outcome")
    ap.add_argument(
        "--sft-specialists",
        default="",
        help="comma-separated domains whose teacher is SFT on the domain only",
    )
    ap.add_argument(
        "--sft-steps", type=int, default=150, help="updates of an SFT specialist (4096 tokens each)"
    )
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--mopd-steps", type=int, default=None, help="the MOPD run's updates (default: --steps)")
    ap.add_argument("--mopd-lr", type=float, default=None, help="the MOPD run's lr (default: --lr)")
    ap.add_argument("--mopd-seed", type=int, default=0, help="the MOPD run's seed (sampling, prompt order)")
    ap.add_argument("--balance-domains", action="store_true", help="MOPD: each domain's prompts as many")
    ap.add_argument("--full-vocab-kl", action="store_true", help="MOPD: exact reverse KL (shared tokenizer)")
    ap.add_argument(
        "--teacher-sampled", default="", help="MOPD: DOMAIN=SHARE,... groups sampled by the domain's teacher"
    )
    ap.add_argument(
        "--workers", type=int, default=1, help="processes for the evaluations and video generation"
    )
    ap.add_argument(
        "--score-only",
        action="store_true",
        help="only score the base's SFT checkpoint on the held-out set (an SFT recipe's row), then stop",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out
    sft = sft_checkpoint(args.base)
    videos = sorted(  # every container the set holds (.mp4, .mkv, .webm), as the stages read them
        str(p)
        for p in (args.base / "videos").rglob("*")
        if p.suffix in VIDEO_SUFFIXES and p.with_suffix(".json").is_file()
    )
    prompts = domain_prompts(videos, out / "prompts", "train", kinds=["timelens", "videomme"], captions=True)
    by = {d: [p for p in prompts if p.reference["domain"] == d] for d in DOMAINS}
    sched = MOPDSchedule(steps=args.steps, lr=args.lr, prompts_per_step=args.prompts, save_every=args.steps)

    def rl(d: str, init: str, name: str) -> str:
        s = MOPDSettings(
            group_size=args.group, max_new_tokens=args.tokens, loss_agg_mode="token-mean", domains=(d,)
        )
        r = train_mopd(init, {}, by[d], out / name, sched, s, {d: REWARDS[d]}, device=args.device)
        return str(r.checkpoint_dir)

    held = heldout_videos(args) or videos
    if args.score_only:
        row = evaluate(sft, held, out / "eval" / "sft", args)
        row.pop("_results", None)
        (out / "score.json").write_text(json.dumps({"checkpoint": sft, **row}, indent=1))
        print(json.dumps(row))
        return
    ckpts, seconds = {"sft": sft}, {}
    for d in DOMAINS:
        t0 = time.perf_counter()
        if d in args.sft_specialists.split(","):
            ckpts[f"specialist:{d}"] = sft_specialist(sft, d, out / f"specialist-{d}-sft", args)
        elif d == "grounding" and args.grounding == "video_rl":
            ckpts[f"specialist:{d}"] = video_rl_specialist(sft, videos, out / "specialist-grounding", args)
        else:
            ckpts[f"specialist:{d}"] = rl(d, sft, f"specialist-{d}")
        seconds[f"specialist:{d}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpts["sequential"] = rl("mcq", ckpts["specialist:grounding"], "sequential-mcq")
    seconds["sequential"] = time.perf_counter() - t0 + seconds["specialist:grounding"]
    t0 = time.perf_counter()
    teachers = {d: TeacherSpec(checkpoint=ckpts[f"specialist:{d}"]) for d in DOMAINS}
    s = MOPDSettings(
        group_size=args.group, max_new_tokens=args.tokens, alpha=args.alpha, domains=DOMAINS,
        full_vocab_kl=args.full_vocab_kl, teacher_sampled=dict(_shares(args.teacher_sampled)),
    )  # fmt: skip
    steps = args.mopd_steps or args.steps
    mopd_prompts = prompts
    if args.balance_domains:  # every domain as often as the largest (the pool is mostly MCQs otherwise)
        most = max(len(v) for v in by.values())
        mopd_prompts = [p for d in DOMAINS for p in (by[d] * (most // len(by[d]) + 1))[:most]]
    sched_mopd = MOPDSchedule(
        steps=steps, lr=args.mopd_lr or args.lr, prompts_per_step=args.prompts, save_every=steps,
        seed=args.mopd_seed,
    )  # fmt: skip
    ckpts["mopd"] = str(
        train_mopd(
            sft, teachers, mopd_prompts, out / "mopd", sched_mopd, s, REWARDS, device=args.device
        ).checkpoint_dir
    )
    seconds["mopd"] = time.perf_counter() - t0

    jobs = [(name, ck, held, out / "eval" / name.replace(":", "-"), args) for name, ck in ckpts.items()]
    with ProcessPoolExecutor(args.workers) as ex:
        done = dict(ex.map(_evaluate_job, jobs))
    results = {name: done[name].pop("_results") for name in ckpts}
    table = {name: done[name] for name in ckpts}
    vs_sft = {  # per-query IoU difference against the SFT checkpoint (paired sign-flip test)
        name: paired_grounding(results[name], results["sft"]).get("timelens", {})
        for name in ckpts
        if name != "sft"
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
        "grounding_vs_sft": vs_sft,
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
    lines += [
        f"Grounding vs SFT ({len(held)} held-out videos): "
        + ", ".join(
            f"{n} {r.get('delta', float('nan')):+.2f} (p {r.get('p_value', float('nan')):.4f})"
            for n, r in vs_sft.items()
        )
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
