"""Agent warm-up step time with the shared prefix (keye.model.shared_prefix) against whole samples, the baseline
measured in the same run, at several batch sizes; both from the same weights and the same demonstration picks, so
the losses of the two must agree step for step (printed beside the times).

Why: the warm-up recipe that teaches the tools (4500 steps x 4 demonstrations) took ~0.44 s a step on whole samples
on the 2-core Xeon, ~33 min; the demonstrations share ~1160 of their ~1470 tokens (bench/RESULTS.md `## agent
warm-up with a shared prefix`).

  python bench/agent_warmup_speed.py --sft WS/checkpoints/<sft>/final --videos WS/videos/<set> \
      [--batches 1,4,16 --steps 12 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--videos", required=True)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per point (after 2 untimed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the points as JSON here")
    args = ap.parse_args()

    import torch

    from keye.agent.tasks import annotations_of, corpus, derive_tasks
    from keye.core.config import load_config
    from keye.data.sampling import SamplingPolicy
    from keye.rl.agent_rl import demo_warmup, demonstrations, env_factory
    from keye.rl.freezing import freeze_vision_and_projector
    from keye.serve.chat import ChatModel
    from keye.stages.agent_rl import settings

    s = load_config(REPO / "pipelines.yaml").agent_rl
    videos = sorted(str(v) for v in Path(args.videos).iterdir() if v.suffix in SUFFIXES)
    policy = SamplingPolicy.model_validate_json((Path(args.sft) / "sampling_policy.json").read_text())
    tasks = derive_tasks(videos, policy, s.first_fps, "train", s.frames_max, kinds=s.tools)
    _, _, tools = settings(s)
    chat = ChatModel.from_checkpoint(args.sft, device=args.device)
    demos = demonstrations(tasks, env_factory(chat, corpus(annotations_of(videos)), tools))
    start = {k: v.clone() for k, v in chat.model.state_dict().items()}
    print(f"{len(demos)} demonstrations, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU kernels {torch.backends.cpu.get_cpu_capability()}", flush=True)  # fmt: skip
    points = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = {"batch": batch}
        for name, off in (("whole", True), ("shared", False)):
            chat.model.load_state_dict(start)
            freeze_vision_and_projector(chat.model)
            demo_warmup(chat, demos, 2, 1e-3, seed=1, batch_size=batch, no_shared_prefix=off)  # warm caches
            chat.model.load_state_dict(start)
            m = demo_warmup(chat, demos, args.steps, 1e-3, seed=0, batch_size=batch, no_shared_prefix=off)
            row[f"{name}_s_per_step"] = m["warmup_seconds"] / args.steps  # the steps, not the encoding
            row[f"{name}_loss_last"] = m["warmup_loss_last"]
            row[f"{name}_rows_share"] = m["warmup_rows_share"]
        row["speedup"] = row["whole_s_per_step"] / row["shared_s_per_step"]
        points.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
