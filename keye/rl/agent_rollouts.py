"""Multi-turn agent rollouts: the policy writes a turn, the environment runs its tool calls, the tool outputs (text
and frames) are appended as a tool turn, and so on until an answer or a budget. The trajectory keeps the exact
token ids: the sampled ones (trained, with the sampler's log-probs) and the tool turns' (masked: the model did not
write them), so the trainer scores the very sequence the sampler saw (keye.rl.sequence_policy).

Budgets: `max_new_tokens` per model turn, `max_response_tokens` for everything after the prompt (model + tool
tokens), and the environment's turn and per-turn call limits. Sampling is seeded per (task, sample, turn) with the
rule of keye.serve.batching.seeded_generator, so the same seed and weights give the same trajectories.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from keye.agent.env import AgentTask, ToolEnv
from keye.serve.chat import ChatRequestError


@dataclass
class AgentSettings:
    group_size: int = 4
    max_new_tokens: int = 64  # per model turn
    max_response_tokens: int = 1024  # model + tool tokens after the prompt
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Trajectory:
    """One episode. `response` is every token after the prompt; `model_mask` marks the sampled ones."""

    group: int
    task: AgentTask
    prompt: Any  # keye.model.generate.Prompt of the opening messages with the tools offered
    response: list[int] = field(default_factory=list)
    model_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0.0 on tool tokens
    patches: list[torch.Tensor] = field(default_factory=list)  # frames of the whole sequence, in order
    grids: list[torch.Tensor] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation after the prompt
    calls: list[dict[str, Any]] = field(default_factory=list)  # every tool call with its turn and outcome
    reward: float = 0.0
    finish_reason: str = (
        ""  # answer | max_turns | length (a turn hit max_new_tokens) | tokens (response budget)
    )
    turns: int = 0

    @property
    def pixel_patches(self) -> torch.Tensor | None:
        return torch.cat(self.patches) if self.patches else None

    @property
    def patch_grids(self) -> torch.Tensor | None:
        return torch.cat(self.grids) if self.grids else None

    @property
    def model_tokens(self) -> int:
        return int(sum(self.model_mask))

    @property
    def tool_tokens(self) -> int:
        return len(self.response) - self.model_tokens

    def full_ids(self) -> list[int]:
        return [int(t) for t in self.prompt.input_ids.tolist()] + list(self.response)


def _frames_summary(content: Any) -> Any:
    """A message's content for the trajectory table: frames become their times."""
    if isinstance(content, list):
        return [
            {"type": "video", "times": [round(float(t), 3) for t in p["times"]]}
            if p.get("type") == "video" and "times" in p
            else p
            for p in content
        ]
    return content


def _append(
    traj: Trajectory, ids: Sequence[int], model: bool, logprobs: Sequence[float] | None = None
) -> None:
    traj.response.extend(int(t) for t in ids)
    traj.model_mask.extend([model] * len(ids))
    traj.logprobs.extend(list(logprobs) if logprobs is not None else [0.0] * len(ids))


def _tool_turn(chat: Any, traj: Trajectory, messages: list[dict[str, Any]], last_token: int | None) -> None:
    """Close the model's turn and append the tool turn plus the next generation prompt (all masked)."""
    tok = chat.tok
    sep = "\n" if last_token == tok.eos_id else tok.tok.id_to_token(tok.eos_id) + "\n"
    _append(traj, tok.encode(sep), model=False)
    try:
        built = chat.build_prompt(messages)
    except (
        ChatRequestError
    ) as e:  # a tool returned content the template cannot lay out: tell the model instead
        messages = [
            {"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": f"Error: {e}"}
            for m in messages
        ]
        built = chat.build_prompt(messages)
    _append(traj, built.input_ids.tolist(), model=False)
    if built.pixel_patches is not None:
        traj.patches.append(built.pixel_patches)
        traj.grids.append(built.patch_grids)
    traj.messages.extend({**m, "content": _frames_summary(m["content"])} for m in messages)


def agent_rollout(
    chat: Any,
    tasks: Sequence[AgentTask],
    make_env: Callable[[], ToolEnv],
    settings: AgentSettings,
    seed: int | None = None,
    generate_fn: Callable[..., Any] | None = None,
) -> list[list[Trajectory]]:
    """`settings.group_size` episodes per task, run turn by turn in one generation batch per turn."""
    from keye.model.generate import Prompt, generate
    from keye.serve.batching import seeded_generator

    gen = generate_fn or generate
    shared = {} if generate_fn else {"share_prefix": True}  # every episode opens with the same tool block
    device = chat.model.device
    episodes: list[tuple[Trajectory, ToolEnv, int, int]] = []
    for i, task in enumerate(tasks):
        for k in range(settings.group_size):
            env = make_env()
            opening = env.reset(task)
            prompt = chat.build_prompt(opening, tools=env.tool_specs())
            traj = Trajectory(group=i, task=task, prompt=prompt)
            if prompt.pixel_patches is not None:
                traj.patches.append(prompt.pixel_patches)
                traj.grids.append(prompt.patch_grids)
            episodes.append((traj, env, i, k))
    active = list(range(len(episodes)))
    try:
        while active:
            batch = []
            for e in active:
                traj, env, i, k = episodes[e]
                room = settings.max_response_tokens - len(traj.response)
                g = None
                if seed is not None:
                    g = seeded_generator(seed + i, k + settings.group_size * traj.turns, device)
                batch.append(
                    Prompt(
                        input_ids=torch.tensor(traj.full_ids(), dtype=torch.int64),
                        pixel_patches=traj.pixel_patches,
                        patch_grids=traj.patch_grids,
                        max_new_tokens=max(1, min(settings.max_new_tokens, room)),
                        generator=g,
                    )
                )
            results = gen(
                chat.model,
                batch,
                temperature=settings.temperature,
                top_p=settings.top_p,
                eos_token_ids=chat.eos_ids,
                decode=chat.decode,
                **shared,
            )
            still = []
            for e, r in zip(active, results, strict=True):
                traj, env, _, _ = episodes[e]
                text = r.text if r.text is not None else chat.decode(r.token_ids)
                _append(traj, r.token_ids, model=True, logprobs=r.logprobs)
                traj.turns += 1
                truncated = r.finish_reason == "length"
                step = env.step(text, truncated=truncated)
                traj.messages.append({"role": "assistant", "content": text})
                for c in step.calls:
                    traj.calls.append({"turn": traj.turns, **c})
                if step.done:
                    traj.reward = float(step.reward or 0.0)
                    traj.finish_reason = "length" if truncated else "max_turns" if step.calls else "answer"
                    continue
                _tool_turn(chat, traj, step.messages, r.token_ids[-1] if r.token_ids else None)
                if len(traj.response) >= settings.max_response_tokens:
                    traj.reward = float(env.finish(text).reward or 0.0)
                    traj.finish_reason = "tokens"
                    continue
                still.append(e)
            active = still
    finally:
        for _, env, _, _ in episodes:
            env.close()
    groups: list[list[Trajectory]] = [[] for _ in tasks]
    for traj, _, i, _ in episodes:
        groups[i].append(traj)
    return groups


# ------------------------------------------------------------------------------------------------ storage
TRAJECTORY_COLUMNS = (
    "step", "group", "sample", "task_id", "task_kind", "reward", "finish_reason", "turns", "tool_calls",
    "tool_errors", "model_tokens", "tool_tokens", "tools_used", "messages_json", "calls_json",
)  # fmt: skip


def trajectory_rows(groups: Sequence[Sequence[Trajectory]], step: int) -> list[dict[str, Any]]:
    rows = []
    for group in groups:
        for k, t in enumerate(group):
            rows.append(
                {
                    "step": int(step),
                    "group": int(t.group),
                    "sample": k,
                    "task_id": t.task.id,
                    "task_kind": t.task.kind,
                    "reward": float(t.reward),
                    "finish_reason": t.finish_reason,
                    "turns": int(t.turns),
                    "tool_calls": len(t.calls),
                    "tool_errors": sum(1 for c in t.calls if not c.get("ok")),
                    "model_tokens": t.model_tokens,
                    "tool_tokens": t.tool_tokens,
                    "tools_used": sorted({str(c["name"]) for c in t.calls if c.get("ok") and c.get("name")}),
                    "messages_json": json.dumps(t.messages, default=_json_default),
                    "calls_json": json.dumps(t.calls, default=_json_default),
                }
            )
    return rows


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return f"<array {list(o.shape)}>"
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def write_trajectories(path: Any, rows: Sequence[dict[str, Any]]) -> Any:
    """The rows as one Parquet file (pyarrow), written atomically: what the stage logs to MLflow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from keye.core.atomic import atomic_path

    table = pa.Table.from_pylist(list(rows)) if rows else pa.table({c: [] for c in TRAJECTORY_COLUMNS})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def rollout_metrics(groups: Sequence[Sequence[Trajectory]]) -> dict[str, float]:
    """Success rate (reward >= 1), tool-call rate (share of episodes with at least one call), mean turns, calls per
    episode, share of failed calls, tokens of model and tool turns."""
    trajs = [t for g in groups for t in g]
    n = max(1, len(trajs))
    calls = sum(len(t.calls) for t in trajs)
    return {
        "success_rate": sum(t.reward >= 1.0 for t in trajs) / n,
        "tool_call_rate": sum(bool(t.calls) for t in trajs) / n,
        "turns_mean": sum(t.turns for t in trajs) / n,
        "tool_calls_per_episode": calls / n,
        "tool_error_share": sum(1 for t in trajs for c in t.calls if not c.get("ok")) / max(1, calls),
        "model_tokens_mean": sum(t.model_tokens for t in trajs) / n,
        "tool_tokens_mean": sum(t.tool_tokens for t in trajs) / n,
    }
