"""Does the tiny model learn to copy from tool output with more demonstration warm-up? (issue 19 diagnostic)

Search and python tasks only (no video decoding: they are derived from the sidecar annotations alone), the stage's
own `demo_warmup` from the SFT checkpoint for each (steps, lr, batch) of a grid, then every held-out task answered
greedily with its tools (`keye.rl.agent_eval`). The search answer is a span copied from the tool turn; the python
answer needs the question's numbers copied into the cell. Meant for the H200 (5000 steps take ~4 min there; on the
2-core CPU ~1 hour).

  python bench/agent_warmup_probe.py --sft WS/checkpoints/<sft>/final --videos WS/videos/<set> --out OUT \
      --grid 1500:3e-3:4,5000:3e-3:4 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, help="the SFT checkpoint directory")
    ap.add_argument("--videos", required=True, help="a folder of sidecar annotations (<stem>.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", required=True, help="comma-separated steps:lr:batch")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=None, help="held-out tasks answered (default: all)")
    args = ap.parse_args()

    import torch

    from keye.agent.env import EnvLimits, ToolEnv
    from keye.agent.sandbox import SandboxLimits
    from keye.agent.search import SearchIndex
    from keye.agent.tasks import corpus, python_tasks, search_tasks
    from keye.agent.tools import PythonTool, SearchTool
    from keye.rl.agent_eval import evaluate_agent, summarize
    from keye.rl.agent_rl import demo_warmup, demonstrations
    from keye.rl.rewards import get_reward
    from keye.serve.chat import ChatModel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    anns = [json.loads(p.read_text()) for p in sorted(Path(args.videos).glob("*.json"))]
    anns = [a for a in anns if a.get("schema") == "keye.annotations/v1"]
    train = [t for a in anns if a["split"] == "train" for t in search_tasks(a) + python_tasks(a)]
    heldout = [t for a in anns if a["split"] == "heldout" for t in search_tasks(a) + python_tasks(a)]
    heldout = heldout[: args.eval_limit]
    index = SearchIndex(corpus(anns))

    def make_env() -> ToolEnv:
        tools = [SearchTool(index), PythonTool(SandboxLimits(time_s=5))]
        return ToolEnv(tools, get_reward("agent_task"), EnvLimits(4, 2))

    demos = demonstrations(train, make_env)
    print(f"train {len(train)} held-out {len(heldout)} demos {len(demos)}", flush=True)
    results: dict[str, dict] = {}
    for point in args.grid.split(","):
        steps, lr, batch = point.split(":")
        chat = ChatModel.from_checkpoint(args.sft, device=args.device)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        m = demo_warmup(chat, demos, int(steps), float(lr), args.seed, batch_size=int(batch))
        warm_s = time.perf_counter() - t0
        rows = evaluate_agent(
            chat, heldout, make_env, max_new_tokens=128, max_response_tokens=1024, with_baseline=False
        )
        results[point] = {"warm_s": round(warm_s, 1), **m, **summarize(rows)}
        print(point, json.dumps(results[point]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
