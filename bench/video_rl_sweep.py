"""Video-RL recipe sweep: many RL settings x seeds from one SFT checkpoint, each scored on the held-out TimeLens
queries with the evaluation's own prompts, greedy decoding and IoU, and paired against the SFT checkpoint.

Why: on the 2-core CPU one RL run of the default pipeline and its evaluation take 6-10 minutes, too slow to learn
which recipe moves grounding. `record` (CPU, PyAV) decodes every frame the prompts need once into a cache beside a
copy of the checkpoint; `sweep` (a GPU machine, no PyAV needed) replays the frames from that cache and runs the
library's own RL loop (keye.rl.video_rl.train_video_rl) and predictor (keye.eval.predict) for each setting, several
processes sharing the GPU. A recipe found here is then confirmed by the default pipeline on CPU.

  python bench/video_rl_sweep.py record --workspace WS --checkpoint WS/checkpoints/<sft>/final --out .rlsweep
  python bench/video_rl_sweep.py sweep --data .rlsweep --grid grid.json --out $OUT --workers 8
grid.json: {"base": {video_rl fields}, "variants": {"name": {overrides}}, "seeds": [0, 1, 2]}
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
EVAL_KINDS = ("timelens", "videomme", "videomme_v2")


def _scores(questions: list, raws: list[str]) -> list[float]:
    """Per question: IoU of a grounding query, 1/0 of a multiple-choice answer."""
    from keye.eval.scoring import score_one

    out = []
    for q, r in zip(questions, raws, strict=True):
        rec = score_one(q, r)
        out.append(float(rec["iou"]) if q.is_grounding else float(rec["correct"]))
    return out


def _swap_paths(obj: Any, old: str, new: str) -> Any:
    """Every string under obj with the video folder `old` replaced by `new` (prompts and questions name files)."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, list):
        return [_swap_paths(x, old, new) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_swap_paths(x, old, new) for x in obj)
    if isinstance(obj, dict):
        return {k: _swap_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, Path):
        return Path(str(obj).replace(old, new))
    return obj


def _frame_key(source: Any, timestamps: Any, size: Any) -> tuple:
    return (
        Path(str(source)).name,
        tuple(round(float(t), 6) for t in timestamps),
        tuple(size) if size else None,
    )


def record(workspace: Path, checkpoint: Path, out: Path, windows: int = 0) -> None:
    import keye.data.video as video
    from keye.eval.export import write_heldout_benchmarks
    from keye.eval.predict import keye_predict_fn
    from keye.eval.readers import read_benchmark
    from keye.rl.prompt_sets import split_prompts
    from keye.serve.chat import ChatModel

    out.mkdir(parents=True, exist_ok=True)
    videos = sorted(
        p
        for p in (workspace / "videos").rglob("*")
        if p.suffix in VIDEO_SUFFIXES and p.with_suffix(".json").is_file()
    )
    videos_dir = videos[0].parent
    probes, frames = {}, {}
    real_probe, real_decode = video.probe, video.decode_frames

    def probe(path: Any, *a: Any, **kw: Any) -> Any:
        info = real_probe(path, *a, **kw)
        probes[Path(str(path)).name] = info
        return info

    def decode_frames(source: Any, timestamps: Any, size: Any = None, *a: Any, **kw: Any) -> Any:
        arr = real_decode(source, timestamps, size, *a, **kw)
        frames[_frame_key(source, timestamps, size)] = np.asarray(arr)
        return arr

    video.probe, video.decode_frames = probe, decode_frames
    train = split_prompts(
        videos, out / "prompts_train", "train", kinds=("timelens",), grounding_windows=windows
    )
    anns = [v.with_suffix(".json") for v in videos]
    files = write_heldout_benchmarks(anns, videos_dir, out / "heldout")
    questions = []
    for kind in EVAL_KINDS:  # the held-out grounding queries and the pooled MCQs (keye.eval.heldout)
        if kind in files:
            questions += read_benchmark(files[kind], videos_dir, kind=kind).questions
    chat = ChatModel.from_checkpoint(checkpoint)
    for p in train:
        chat.build_prompt(p.messages)
    predict = keye_predict_fn(checkpoint, max_new_tokens=24)
    raws = []
    for i in range(0, len(questions), 8):  # the eval stage's batch size
        raws += predict(questions[i : i + 8])
    ious = _scores(questions, raws)
    shutil.copytree(checkpoint, out / "sft", dirs_exist_ok=True)
    old = str(videos_dir)
    data = {
        "probes": {k: {f: getattr(v, f) for f in v.__dataclass_fields__} for k, v in probes.items()},
        "frames": frames,
        "train": [(_swap_paths(p.messages, old, "@VIDEOS@"), p.reference, p.id) for p in train],
        "questions": [_swap_paths(q, old, "@VIDEOS@") for q in questions],
        "cpu_sft": {"raw": raws, "iou": ious},
    }
    with gzip.open(out / "data.pkl.gz", "wb", compresslevel=6) as f:  # synthetic frames compress ~10x
        pickle.dump(data, f)
    print(f"recorded {len(train)} RL prompts, {len(questions)} held-out queries, {len(frames)} frame sets; "
          f"CPU SFT mean score {100 * np.mean(ious):.1f}")  # fmt: skip


def _install_cache(data: dict, videos_dir: Path) -> None:
    """keye.data.video answered from the recorded cache (no PyAV on the device); empty placeholder files stand for
    the videos so the path checks pass."""
    videos_dir.mkdir(parents=True, exist_ok=True)
    for name in data["probes"]:
        (videos_dir / name).touch()

    class VideoRejected(Exception):
        def __init__(self, reason: str):
            super().__init__(reason)
            self.reason = reason

    def probe(path: Any, *a: Any, **kw: Any) -> Any:
        return types.SimpleNamespace(**data["probes"][Path(str(path)).name])

    def decode_frames(source: Any, timestamps: Any, size: Any = None, *a: Any, **kw: Any) -> Any:
        return data["frames"][_frame_key(source, timestamps, size)]

    mod = types.ModuleType("keye.data.video")
    mod.VideoRejected, mod.probe, mod.decode_frames = VideoRejected, probe, decode_frames
    sys.modules["keye.data.video"] = mod
    import keye.data

    keye.data.video = mod


def _job(args: tuple) -> dict:
    data_dir, name, cfg, seed, out_root, device = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with gzip.open(Path(data_dir) / "data.pkl.gz", "rb") as f:
        data = pickle.load(f)
    vdir = Path(out_root) / "videos"
    _install_cache(data, vdir)
    from keye.eval.predict import keye_predict_fn
    from keye.rl.context_rl import ContextRLSettings
    from keye.rl.grpo import GRPOSettings
    from keye.rl.rollouts import RolloutPrompt
    from keye.rl.video_rl import VideoRLSchedule, train_video_rl

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sft = Path(data_dir) / "sft"
    questions = [_swap_paths(q, "@VIDEOS@", str(vdir)) for q in data["questions"]]

    def evaluate(ck: Path) -> list[float]:
        predict = keye_predict_fn(ck, device=device, max_new_tokens=24)
        raws = []
        for i in range(0, len(questions), 8):
            raws += predict(questions[i : i + 8])
        return _scores(questions, raws), raws

    t0 = time.time()
    if name == "sft":
        ious, raws = evaluate(sft)
        return {"name": name, "seed": seed, "iou": ious, "raw": raws, "seconds": time.time() - t0}
    prompts = [RolloutPrompt(_swap_paths(m, "@VIDEOS@", str(vdir)), r, i) for m, r, i in data["train"]]
    if not cfg.get("windows"):  # the whole videos only (the stage's default); windows: + their window prompts
        prompts = [p for p in prompts if "@w" not in p.id]
    gfields = GRPOSettings.__dataclass_fields__
    g = {k: v for k, v in cfg.items() if k in gfields and k != "context_rl"}
    ctx = cfg.get("context_rl") or {}
    if ctx.get("enabled"):
        g["context_rl"] = ContextRLSettings(**{k: v for k, v in ctx.items() if k != "enabled"})
    schedule = VideoRLSchedule(
        steps=cfg["steps"], lr=cfg["lr"], warmup_steps=cfg.get("warmup_steps", 0),
        prompts_per_step=cfg["prompts_per_step"], save_every=10**9, seed=seed,
    )  # fmt: skip
    curve: list[float] = []
    run_dir = Path(out_root) / "runs" / f"{name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    res = train_video_rl(
        sft, prompts, run_dir, schedule, GRPOSettings(**g), cfg["rewards"], device=device,
        log_metrics=lambda m, step: curve.append(float(m.get("reward_mean", float("nan")))),
    )  # fmt: skip
    ious, raws = evaluate(res.checkpoint_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"name": name, "seed": seed, "iou": ious, "raw": raws, "reward_curve": curve,
            "seconds": time.time() - t0}  # fmt: skip


def sweep(data_dir: Path, grid_path: Path, out: Path, workers: int, device: str | None = None) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from keye.eval.compare import paired_difference

    grid = json.loads(grid_path.read_text())
    jobs = [(str(data_dir), "sft", {}, 0, str(out), device)]
    for name, over in grid["variants"].items():
        cfg = {**grid["base"], **over}
        for seed in over.get("seeds", grid.get("seeds", [0])):
            jobs.append((str(data_dir), name, cfg, seed, str(out), device))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    log = open(out / "results.jsonl", "a")
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futures = {ex.submit(_job, j): j for j in jobs}
        for fut in as_completed(futures):
            try:
                r = fut.result()
            except Exception as e:  # one failed setting is reported, the sweep goes on
                j = futures[fut]
                print(f"{j[1]} seed {j[3]} failed: {type(e).__name__}: {e}", flush=True)
                continue
            results.append(r)
            log.write(json.dumps(r) + "\n")
            log.flush()
            print(f"{r['name']} seed {r['seed']} done ({r['seconds']:.0f} s)", flush=True)
    with gzip.open(data_dir / "data.pkl.gz", "rb") as f:
        grounding = np.array([q.is_grounding for q in pickle.load(f)["questions"]])
    base = np.array(next(r["iou"] for r in results if r["name"] == "sft"))
    rows = []
    for r in sorted((r for r in results if r["name"] != "sft"), key=lambda r: (r["name"], r["seed"])):
        new = np.array(r["iou"])
        d = paired_difference(100 * new[grounding], 100 * base[grounding])
        m = paired_difference(100 * new[~grounding], 100 * base[~grounding])
        rows.append({k: r[k] for k in ("name", "seed", "seconds")} | {
            "miou": d["new_mean"], "delta": d["delta"], "p": d["p_value"], "better": d["better"],
            "worse": d["worse"], "mcq": m["new_mean"], "mcq_delta": m["delta"],
            "reward_first5": float(np.mean(r["reward_curve"][:5])), "reward_last5": float(np.mean(r["reward_curve"][-5:])),
        })  # fmt: skip
    summary = {"sft_miou": 100 * float(base[grounding].mean()), "sft_mcq": 100 * float(base[~grounding].mean()),
               "rows": rows}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(f"SFT mIoU {summary['sft_miou']:.1f}, pooled MCQ {summary['sft_mcq']:.1f}")
    for row in rows:
        print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--workspace", type=Path, required=True)
    r.add_argument("--checkpoint", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--windows", type=int, default=0, help="window prompts per grounding query (RL prompts)")
    s = sub.add_parser("sweep")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--grid", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--device", default=None, help="cpu | cuda (default: cuda when there is one)")
    a = ap.parse_args()
    if a.cmd == "record":
        record(a.workspace, a.checkpoint, a.out, a.windows)
    else:
        sweep(a.data, a.grid, a.out, a.workers, a.device)


if __name__ == "__main__":
    main()
