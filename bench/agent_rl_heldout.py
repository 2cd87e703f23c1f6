"""The agent_rl recipe scored on the held-out agent tasks: the SFT checkpoint, the demonstration warm-up alone, and
warm-up + agent GRPO, each answering every held-out task greedily with its tools (and once without, for the
self-correction share), paired sign tests between them.

Why: the stage's recipe (warm-up steps and lr, RL steps and lr, group size) has to be found before the default
pipeline's numbers mean anything, and one `keye run` per point costs the whole flow; this runs the library's own
`train_agent_rl` and the stage's own held-out comparison on a workspace's SFT checkpoint and videos.

  python bench/agent_rl_heldout.py --sft WS/checkpoints/<sft>/final --videos WS/videos/<set> --out OUT \
      [--warmup-steps 150 --warmup-lr 1e-3 --steps 10 --lr 1e-5 --set group_size=4 ...]
--set takes any field of the config's `agent_rl` section (keye.core.config.AgentRLSettings). On a device call with a
wall-clock limit, --time-budget-s T stops RL early (steps are saved one by one and resumed) and leaves
--eval-reserve-s for the held-out comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", required=True, help="the SFT checkpoint directory (a workspace's .../final)")
    ap.add_argument("--videos", required=True, help="the workspace's video folder (videos + sidecar JSON)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REPO / "pipelines.yaml"), help="its agent_rl section is the base")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="agent_rl overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--time-budget-s", type=float, default=None, help="stop RL early (at most `steps`) so that training ends "
        "this many seconds after start minus --eval-reserve-s: a device call with a wall-clock limit still evaluates",
    )  # fmt: skip
    ap.add_argument("--eval-reserve-s", type=float, default=120.0)
    args = ap.parse_args()

    import torch

    from keye.agent.tasks import annotations_of, corpus, derive_tasks
    from keye.core.config import load_config
    from keye.data.sampling import SamplingPolicy
    from keye.rl.agent_rl import AgentRLSchedule, train_agent_rl
    from keye.stages.agent_rl import heldout_comparison, settings

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_config(args.config).agent_rl
    s = base.model_copy(update={k: _value(v) for k, v in (a.split("=", 1) for a in args.set)})
    s = type(base).model_validate(s.model_dump())  # validate the overrides
    videos = sorted(str(v) for v in Path(args.videos).iterdir() if v.suffix in SUFFIXES)
    policy = SamplingPolicy.model_validate_json((Path(args.sft) / "sampling_policy.json").read_text())
    tasks = derive_tasks(videos, policy, s.first_fps, "train", s.frames_max, kinds=s.tools)
    heldout = derive_tasks(videos, policy, s.first_fps, "heldout", s.frames_max, kinds=s.tools)[
        : s.eval_limit
    ]
    docs = corpus(annotations_of(videos))
    print(
        f"tasks: train {dict(Counter(t.kind for t in tasks))}, held-out {dict(Counter(t.kind for t in heldout))}"
    )
    grpo, agent, tools = settings(s)
    schedule = AgentRLSchedule(
        s.steps, s.lr, s.tasks_per_step, s.save_every, seed=args.seed, warmup_steps=s.warmup_steps,
        warmup_lr=s.warmup_lr, warmup_batch_size=s.warmup_batch_size, rl_only_fraction=s.rl_only_fraction,
    )  # fmt: skip
    out = Path(args.out)
    t0 = time.perf_counter()
    log = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)

    def log_metrics(m: dict, step: int) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        print(f"step {step}: reward {m.get('reward_mean', float('nan')):.3f} "
              f"calls {m.get('tool_call_rate', float('nan')):.2f}", flush=True)  # fmt: skip

    def train(steps: int):
        sched = dataclasses.replace(
            schedule, steps=steps, save_every=1 if args.time_budget_s else s.save_every
        )
        return train_agent_rl(
            args.sft, tasks, docs, out / "run", sched, grpo, agent, tools, device=args.device,
            log_metrics=log_metrics,
        )  # fmt: skip

    if args.time_budget_s is None:
        result = train(s.steps)
    else:  # the warm-up and one step, then as many steps as the budget leaves (the run resumes step by step)
        result, done = train(1), 1
        while done < s.steps:
            per = max(json.loads(line)["step_seconds"] for line in log.read_text().splitlines()[-3:])
            left = args.time_budget_s - args.eval_reserve_s - (time.perf_counter() - t0)
            nxt = min(s.steps, done + int(left // (1.15 * per)))
            if nxt <= done:
                break
            result, done = train(nxt), nxt
        print(f"RL steps within the budget: {done} of {s.steps}", flush=True)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    comparison = heldout_comparison(
        args.sft, str(result.checkpoint_dir), heldout, docs, tools, s, args.device
    )
    eval_s = time.perf_counter() - t1
    summary = {
        "settings": s.model_dump(),
        "seed": args.seed,
        "rl_steps": result.steps,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "last_metrics": result.metrics,
        **{k: v for k, v in comparison.items() if k != "rows"},
    }
    (out / "results.json").write_text(json.dumps({**summary, "rows": comparison["rows"]}, indent=1))
    for name in ("before", "warmup", "after"):
        row = comparison.get("rl_over_warmup", {}).get("before") if name == "warmup" else comparison[name]
        if row:
            kinds = " ".join(f"{k[13:]} {v:.2f}" for k, v in row.items() if k.startswith("success_rate_"))
            print(f"{name:7s} success {row['success_rate']:.3f} calls {row['tool_call_rate']:.2f} [{kinds}] "
                  f"self-correction {row.get('self_correction_share', float('nan')):.2f}")  # fmt: skip
    print(f"after vs SFT: gain {comparison['success_gain']:+.3f} p {comparison['sign_test']['p_value']:.2e}")
    if "rl_over_warmup" in comparison:
        w = comparison["rl_over_warmup"]
        print(f"after vs warm-up: gain {w['success_gain']:+.3f} p {w['sign_test']['p_value']:.2e}")
    print(f"train {train_s:.0f} s, eval {eval_s:.0f} s")


if __name__ == "__main__":
    main()
