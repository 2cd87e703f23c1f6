"""The agent evaluation: each held-out agent task answered greedily by a checkpoint with its tools, and once more
without tools; per task whether it succeeded, whether it called a tool and whether looking again (`frames`) turned
its no-tool answer from wrong to right (self-correction). Two checkpoints compare with the exact one-sided sign
test on the paired successes (keye.eval.metrics.paired_advantage: does the second succeed where the first fails
more often than the reverse).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from keye.agent.env import AgentTask, EnvLimits, ToolEnv
from keye.eval.metrics import paired_advantage
from keye.rl.agent_rollouts import AgentSettings, Trajectory, agent_rollout


def evaluate_agent(
    chat: Any,
    tasks: Sequence[AgentTask],
    make_env: Callable[[], ToolEnv],
    *,
    max_new_tokens: int = 64,
    max_response_tokens: int = 1024,
    seed: int = 0,
    with_baseline: bool = True,
) -> list[dict[str, Any]]:
    """One row per task: task_id, kind, reward, success, tool_called, frames_called, turns, finish_reason, calls,
    answer (the last assistant text) and (with the no-tool baseline) baseline_success and self_corrected. Greedy
    (temperature 0), so a checkpoint's rows are fixed."""
    settings = AgentSettings(
        group_size=1, max_new_tokens=max_new_tokens, max_response_tokens=max_response_tokens, temperature=0.0
    )
    runs = [g[0] for g in agent_rollout(chat, tasks, make_env, settings, seed=seed)]
    base: list[Trajectory | None] = [None] * len(tasks)
    if with_baseline:
        probe = make_env()
        reward_fn = probe.reward_fn
        probe.close()
        no_tools = lambda: ToolEnv([], reward_fn, EnvLimits(max_turns=1, max_calls_per_turn=0))  # noqa: E731
        base = [g[0] for g in agent_rollout(chat, tasks, no_tools, settings, seed=seed)]
    rows = []
    for task, t, b in zip(tasks, runs, base, strict=True):
        used = {c["name"] for c in t.calls if c.get("ok")}
        row = {
            "task_id": task.id,
            "kind": task.kind,
            "reward": float(t.reward),
            "success": t.reward >= 1.0,
            "tool_called": bool(t.calls),
            "frames_called": "frames" in used,
            "turns": t.turns,
            "finish_reason": t.finish_reason,
            # what it did, for reading the failures: each call and the last thing it wrote
            "calls": [
                {"name": c.get("name"), "arguments": c.get("arguments"), "ok": c.get("ok")} for c in t.calls
            ],
            "answer": next((m["content"] for m in reversed(t.messages) if m.get("role") == "assistant"), ""),
        }
        if b is not None:
            row["baseline_success"] = b.reward >= 1.0
            row["self_corrected"] = row["frames_called"] and row["success"] and not row["baseline_success"]
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """success_rate, tool_call_rate, per-kind success, and the self-correction share: of the answers that were
    wrong without tools, the share that a `frames` call turned right."""
    n = max(1, len(rows))
    out = {
        "success_rate": sum(r["success"] for r in rows) / n,
        "tool_call_rate": sum(r["tool_called"] for r in rows) / n,
        "n_tasks": float(len(rows)),
    }
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        out[f"success_rate_{kind}"] = sum(r["success"] for r in sub) / len(sub)
    wrong = [r for r in rows if "baseline_success" in r and not r["baseline_success"]]
    if wrong:
        out["self_correction_share"] = sum(r["self_corrected"] for r in wrong) / len(wrong)
    return out


def compare(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Paired comparison of two checkpoints on the same tasks (e.g. SFT vs agent-RL): the sign test on success,
    both summaries, and the gain in tool-call rate."""
    if [r["task_id"] for r in before] != [r["task_id"] for r in after]:
        raise ValueError("the two evaluations are not over the same tasks in the same order")
    test = paired_advantage([r["success"] for r in after], [r["success"] for r in before])
    a, b = summarize(before), summarize(after)
    return {
        "before": a,
        "after": b,
        "success_gain": b["success_rate"] - a["success_rate"],
        "tool_call_rate_gain": b["tool_call_rate"] - a["tool_call_rate"],
        "sign_test": test,
        "significant_at_0.01": float(test["p_value"]) < 0.01,
    }
