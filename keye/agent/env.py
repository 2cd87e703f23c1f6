"""The agent environment: one interface over any set of tools (reset / step, reward at the end, per-turn limits).

`reset(task)` gives the opening messages (the tools are offered through the chat template's tool block, see
`tool_specs`); `step(assistant_text)` reads the model's turn: tool calls are run and their outputs come back as
"tool" messages; a turn without calls is the final answer and ends the episode with the task's reward; so does the
turn budget. A broken call or a failing tool never raises: the model gets an error turn and may try again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keye.agent.tool_calls import ToolCall, error_text, parse_tool_calls
from keye.agent.tools import Tool, ToolError


@dataclass
class AgentTask:
    id: str
    messages: list[dict[str, Any]]  # the opening conversation (OpenAI format; video parts allowed)
    reference: dict[str, Any] = field(default_factory=dict)  # what the reward compares with
    video: str | None = None  # the video file the `frames` tool reads
    video_id: str | None = None  # the corpus key the `search` tool is scoped to
    kind: str = ""  # e.g. "frames", "search", "python": which tool the task is meant to need


@dataclass
class StepResult:
    messages: list[dict[str, Any]]  # "tool" messages to append (empty when done)
    done: bool
    reward: float | None  # set when done
    calls: list[dict[str, Any]]  # the turn's calls: name, arguments, ok, error, seconds


@dataclass
class EnvLimits:
    max_turns: int = 4  # assistant turns per episode (the last one must answer)
    max_calls_per_turn: int = 2


class ToolEnv:
    """Tools + a reward function (completion text, reference) -> float."""

    def __init__(
        self,
        tools: Sequence[Tool],
        reward_fn: Callable[[str, Mapping[str, Any]], float],
        limits: EnvLimits | None = None,
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.reward_fn, self.limits = reward_fn, limits or EnvLimits()
        self.task: AgentTask | None = None
        self.turns = 0

    def tool_specs(self) -> list[dict[str, Any]]:
        return [t.spec for t in self.tools.values()]

    def reset(self, task: AgentTask) -> list[dict[str, Any]]:
        self.task, self.turns = task, 0
        for t in self.tools.values():
            t.reset(task)
        return [dict(m) for m in task.messages]

    def finish(self, text: str) -> StepResult:
        """End the episode now (a budget ran out) with the reward of `text`."""
        if self.task is None:
            raise RuntimeError("call reset(task) before finish()")
        try:
            reward = float(self.reward_fn(text, self.task.reference))
        except Exception:  # a reward that cannot read the answer scores it 0 (keye.rl.rewards' contract)
            reward = 0.0
        return StepResult([], True, reward, [])

    def step(self, assistant_text: str, truncated: bool = False) -> StepResult:
        """Run the calls of one assistant turn; `truncated` (the turn hit its token budget) ends the episode."""
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        self.turns += 1
        turn = parse_tool_calls(assistant_text, self.tool_specs(), id_prefix=f"call_{self.turns}")
        if truncated or not turn.has_calls or self.turns >= self.limits.max_turns:
            result = self.finish(assistant_text)
            result.calls = [
                {
                    "name": getattr(c, "name", None),
                    "arguments": getattr(c, "arguments", None),
                    "ok": False,
                    "error": "not run: the episode ended",
                    "seconds": 0.0,
                }
                for c in turn.calls
            ]
            return result
        messages, record = [], []
        for k, call in enumerate(turn.calls):
            t0 = time.perf_counter()
            entry: dict[str, Any] = {
                "name": getattr(call, "name", None),
                "arguments": getattr(call, "arguments", None),
            }
            if k >= self.limits.max_calls_per_turn:
                content: Any = f"Error: at most {self.limits.max_calls_per_turn} tool calls per turn; this one was not run."
                entry["error"] = "over the per-turn call limit"
            elif not isinstance(call, ToolCall):
                content = error_text(call)
                entry["error"] = call.message
            else:
                try:
                    content = self.tools[call.name](call.arguments)
                except ToolError as e:
                    content = f"Error: {e}"
                    entry["error"] = str(e)
                except Exception as e:  # a tool bug must not kill the trainer; the model is told it failed
                    content = f"Error: the {call.name} tool failed ({type(e).__name__}: {e})"
                    entry["error"] = f"{type(e).__name__}: {e}"
            entry["ok"] = "error" not in entry
            entry["seconds"] = time.perf_counter() - t0
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
            record.append(entry)
        return StepResult(messages, False, None, record)

    def close(self) -> None:
        for t in self.tools.values():
            t.close()
