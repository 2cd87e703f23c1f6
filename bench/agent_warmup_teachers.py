"""The demonstration warm-up of agent_rl with this teacher or the previous one, scored on the held-out agent tasks
(issue 19 diagnostic).

`current`: moments derived only where one look of `frames_max` frames can pin them, answered with the stamp of the
look's first frame at or after the moment, `frames_max` 10, the teacher's look at 5 fps. `previous`: every moment
(a long video's 75 s brackets too), answered with the exact moment to 0.1 s, `frames_max` 8, the look at 4 fps (the
baseline, measured in the same run). Each: the stage's `demo_warmup` from the SFT checkpoint, then the stage's
`heldout_comparison` (SFT vs the warm-up, greedy, with tools and once without for the self-correction share).

  python bench/agent_warmup_teachers.py --teacher current --sft SFT --videos VIDEOS --out OUT \
      [--steps 1500 --batch 16 --lr 3e-3 --device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", choices=["current", "previous"], required=True)
    ap.add_argument("--sft", required=True, help="the SFT checkpoint directory")
    ap.add_argument("--videos", required=True, help="the video folder (videos + sidecar JSON)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    import torch

    import keye.agent.demos as demos_mod
    from keye.agent.tasks import annotations_of, corpus, derive_tasks
    from keye.core.config import load_config
    from keye.data.sampling import SamplingPolicy
    from keye.determinism import seed_everything
    from keye.rl.agent_rl import demo_warmup, demonstrations, env_factory
    from keye.rl.freezing import freeze_vision_and_projector
    from keye.rl.policy_checkpoints import export_policy
    from keye.serve.chat import ChatModel
    from keye.stages.agent_rl import heldout_comparison, settings

    t0 = time.perf_counter()
    base = load_config(str(REPO / "pipelines.yaml")).agent_rl
    frames_max = 10 if a.teacher == "current" else 8
    s = type(base).model_validate(
        {**base.model_dump(), "max_new_tokens": 128, "max_response_tokens": 1024, "frames_max": frames_max}
    )
    look = s.frames_max
    if a.teacher == "previous":
        demos_mod.LOOK_FPS = 4.0
        demos_mod._first_frame_after = lambda t: lambda _tool_messages: f"<answer>{t:.1f}</answer>"
        look = 10**6  # every moment, however wide its bracket
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    videos = sorted(str(v) for v in Path(a.videos).iterdir() if v.suffix in SUFFIXES)
    policy = SamplingPolicy.model_validate_json((Path(a.sft) / "sampling_policy.json").read_text())
    tasks = derive_tasks(videos, policy, s.first_fps, split="train", look_frames=look)
    heldout = derive_tasks(videos, policy, s.first_fps, split="heldout", look_frames=look)
    docs = corpus(annotations_of(videos))
    _, _, tools = settings(s)
    seed_everything(0)
    chat = ChatModel.from_checkpoint(a.sft, device=a.device)
    freeze_vision_and_projector(chat.model)
    demos = demonstrations(tasks, env_factory(chat, docs, tools))
    info = {
        "teacher": a.teacher,
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "train": dict(Counter(t.kind for t in tasks)),
        "heldout": dict(Counter(t.kind for t in heldout)),
        "demos": len(demos),
        "steps": a.steps,
        "batch": a.batch,
        "lr": a.lr,
    }
    print(json.dumps(info), flush=True)
    t1 = time.perf_counter()
    warm = demo_warmup(chat, demos, a.steps, a.lr, 0, batch_size=a.batch)
    warm_s = time.perf_counter() - t1
    print(f"[{a.teacher}] warm-up {warm} in {warm_s:.0f} s", flush=True)
    warm_dir = out / f"warm_{a.teacher}"
    export_policy(chat, a.sft, warm_dir)
    del chat
    t2 = time.perf_counter()
    cmp = heldout_comparison(a.sft, str(warm_dir), heldout, docs, tools, s, a.device)
    result = {**info, **warm, "warmup_seconds": warm_s, "eval_seconds": time.perf_counter() - t2}
    result.update({k: v for k, v in cmp.items() if k != "rows"})
    (out / f"results_{a.teacher}.json").write_text(
        json.dumps({**result, "rows": cmp["rows"]}, indent=1, default=str)
    )
    for name in ("before", "after"):
        r = cmp[name]
        kinds = " ".join(f"{k[13:]} {v:.2f}" for k, v in r.items() if k.startswith("success_rate_"))
        print(f"[{a.teacher}] {name}: success {r['success_rate']:.3f} calls {r['tool_call_rate']:.2f} {kinds} "
              f"self-correction {r.get('self_correction_share', float('nan')):.3f}")  # fmt: skip
    print(f"[{a.teacher}] gain {cmp['success_gain']:+.3f} p {cmp['sign_test']['p_value']:.2e}, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
