"""Tool-use demonstrations for agent SFT: each derived task solved by a scripted teacher that calls the right tool
through the real environment (so the tool turns hold real frames, search hits and cell output) and then answers.

Why: agent RL only learns from episodes that differ in reward; a model that never writes a <tool_call> gives
none (measured: a tiny model from scratch makes 0 calls in 32 episodes). A few demonstrations in the SFT mix
teach the call format and when each tool helps; RL then sharpens the choice. The teacher reads the task's
reference (it is a teacher), never the tool outputs' ground truth beyond what the tool returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from keye.agent.env import AgentTask, ToolEnv
from keye.data.tokenizer import TOOL_CALL_END, TOOL_CALL_START, format_time

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
LOOK_FPS = 5.0  # the teacher's closer look: with frames_max 10, frames <= 0.25 s apart over a 2.5 s gap


def _call(name: str, **arguments: Any) -> str:
    return f"{TOOL_CALL_START}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TOOL_CALL_END}"


def _text(task: AgentTask) -> str:
    content = task.messages[-1]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


Turn = str | Callable[[list[dict[str, Any]]], str]


def _first_frame_after(t: float) -> Callable[[list[dict[str, Any]]], str]:
    """The answer read off the look: the stamp of its first frame at or after the moment, written as the frame's
    stamp is (format_time), so the answer is a copy of text the tool turn holds; the exact moment (t to 0.1 s) is
    on no frame, so nothing the model sees determines it."""

    def answer(tool_messages: list[dict[str, Any]]) -> str:
        times = [
            float(x)
            for m in tool_messages
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if part.get("type") == "video"
            for x in part.get("times", ())
        ]
        shown = [x for x in times if x >= t - 1e-6]
        return f"<answer>{format_time(min(shown) if shown else t)}</answer>"

    return answer


def teacher_turns(task: AgentTask) -> list[Turn] | None:
    """The teacher's assistant turns (a call, then the answer), or None for a task it has no script for; an answer
    that depends on what the tool returned is a function of that turn's tool messages."""
    q, ref = _text(task), task.reference
    if task.kind == "frames" and ref.get("type") == "number":  # a moment: look again between the two opening
        # frames that bracket it (what the first view shows; never the answer itself), then read it off the look
        t = float(ref["value"])
        a, b = ref.get("bracket", (max(0.0, t - 1.0), t + 1.0))
        look = _call("frames", start=round(float(a), 1), end=round(float(b), 1), fps=LOOK_FPS)
        return ["Let me look closer between those frames. " + look, _first_frame_after(t)]
    if task.kind == "frames" and ref.get("type") == "mcq":  # a missed object: look where it appears
        m = re.search(r"appears briefly at " + _NUM, q)
        if m is None:
            return None
        start = float(m.group(1))
        return ["I did not see it; let me look again. " + _call("frames", start=start, end=start + 1.0, fps=2.0),
                f"<answer>{ref['answer']}</answer>"]  # fmt: skip
    if task.kind == "search":
        m = re.search(r"does (.+) disappear", q)
        if m is None:
            return None
        s, e = ref["span"]
        return [
            _call("search", query=f"{m.group(1)} disappears", k=1),
            f"<answer>{s:.1f} - {e:.1f} seconds</answer>",
        ]
    if task.kind == "python":
        spans = re.findall(_NUM + r" - " + _NUM + " s", q)
        if spans:  # the numbers as the question writes them: the model copies them, digit for digit
            listed = ", ".join(f"({a}, {b})" for a, b in spans)
            code = f"spans = sorted([{listed}])\ntotal, end = 0.0, -1.0\n"
            code += "for s, e in spans:\n    if e > end:\n        total += e - max(s, end)\n        end = e\nround(total, 2)"
        else:
            m = re.search(
                r"lasts " + _NUM + r" seconds and an object is visible from " + _NUM + " to " + _NUM, q
            )
            if m is None:
                return None
            dur, a, b = m.groups()
            code = f"round(100 * ({b} - {a}) / {dur}, 1)"
        return [_call("python", code=code), f"<answer>{ref['value']}</answer>"]
    return None


def demonstration(task: AgentTask, make_env: Callable[[], ToolEnv]) -> dict[str, Any] | None:
    """{"messages", "tools", "reward"}: the teacher's conversation with the real tool turns (frames as decoded
    arrays, as keye.serve.chat takes them), or None without a script. `reward` is the environment's for the final
    answer, so a demonstration that does not solve its task can be dropped."""
    turns = teacher_turns(task)
    if turns is None:
        return None
    env = make_env()
    try:
        messages = env.reset(task)
        tools = env.tool_specs()
        # its tool not offered: the script's call would meet an error turn and its answer would come from nowhere
        if task.kind not in {t["function"]["name"] for t in tools}:
            return None
        reward = None
        last_tool: list[dict[str, Any]] = []
        for turn in turns:
            text = turn if isinstance(turn, str) else turn(last_tool)
            step = env.step(text)
            messages.append({"role": "assistant", "content": text})
            if step.done:
                reward = step.reward
                break
            messages.extend(step.messages)
            last_tool = list(step.messages)
        return {"messages": messages, "tools": tools, "reward": reward}
    finally:
        env.close()
