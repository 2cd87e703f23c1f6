"""The agent's tools, one class each with its OpenAI function spec: `frames` (look again at the video), `search`
(full text over the run's captions / subtitles / dense captions) and `python` (a sandboxed code cell).

A tool is told the task at `reset` and answers a checked call (keye.agent.tool_calls) with the content of a tool
turn: a string, or content parts whose frames the chat model lays out exactly as a prompt's (a "video" part with
decoded frames and their times). A call the tool cannot honour raises ToolError; the environment turns it into an
error turn for the model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from keye.agent.sandbox import SandboxLimits, run_cell
from keye.agent.search import SearchIndex
from keye.data.sampling import SamplingPolicy, plan_frames
from keye.data.video import VideoRejected, decode_frames, probe


class ToolError(ValueError):
    """A call the tool cannot honour (out-of-range times, no video, ...); the message is for the model."""


class Tool(Protocol):
    name: str
    spec: dict[str, Any]

    def reset(self, task: Any) -> None: ...

    def __call__(self, arguments: Mapping[str, Any]) -> str | list[dict[str, Any]]: ...

    def close(self) -> None: ...


def function_spec(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


class FramesTool:
    """Frames of the task's video over [start, end] at the requested rate and size, planned by the training
    frame sampler (keye.data.sampling.plan_frames) and decoded by keye.data.video.decode_frames."""

    name = "frames"

    def __init__(self, policy: SamplingPolicy, max_frames: int = 8, max_fps: float = 8.0) -> None:
        self.policy, self.max_frames, self.max_fps = policy, max_frames, max_fps
        self.video: Path | None = None
        self.spec = function_spec(
            "frames",
            f"Look again: frames of [start, end] seconds at fps (at most {max_frames} frames), "
            "tokens_per_frame sharper.",
            {
                "start": {"type": "number", "minimum": 0},
                "end": {"type": "number", "minimum": 0},
                "fps": {"type": "number", "minimum": 0.1, "maximum": max_fps},
                "tokens_per_frame": {
                    "type": "integer",
                    "minimum": policy.min_tokens_per_frame,
                    "maximum": policy.max_tokens_per_frame,
                },
            },
            ["start", "end"],
        )

    def reset(self, task: Any) -> None:
        self.video = Path(task.video) if getattr(task, "video", None) else None

    def __call__(self, arguments: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.video is None:
            raise ToolError("this task has no video to look at")
        try:
            info = probe(self.video, min_duration=0.0)
        except VideoRejected as e:
            raise ToolError(f"the video cannot be read ({e.reason})") from e
        start, end = float(arguments["start"]), min(float(arguments["end"]), info.duration)
        if not 0 <= start < end:
            raise ToolError(f"need 0 <= start < end <= {info.duration:.1f} seconds, got [{start:g}, {end:g}]")
        tokens = int(arguments.get("tokens_per_frame") or self.policy.min_tokens_per_frame)
        policy = self.policy.model_copy(
            update={
                "fps": float(arguments.get("fps") or self.policy.fps),
                "min_frames": 1,
                "max_frames": self.max_frames,
                "frame_factor": 1,
                "min_tokens_per_frame": tokens,
                "max_tokens_per_frame": tokens,
                "total_token_budget": tokens * self.max_frames,
                "duration_scaling": False,
            }
        )
        plan = plan_frames(end - start, info.width, info.height, policy, video_fps=info.fps or None)
        times = [start + t for t in plan.timestamps]
        try:
            frames = decode_frames(self.video, times, size=(plan.height, plan.width))
        except VideoRejected as e:
            raise ToolError(f"the frames cannot be decoded ({e.reason})") from e
        return [
            {"type": "video", "frames": frames, "times": times},
            {"type": "text", "text": f"{len(times)} frames from {start:.1f} to {end:.1f} seconds."},
        ]

    def close(self) -> None:
        pass


class SearchTool:
    """Ranked full-text search over a local corpus, scoped to the task's video when the corpus records videos."""

    name = "search"

    def __init__(self, index: SearchIndex, max_results: int = 5) -> None:
        self.index, self.max_results, self.video = index, max_results, None
        self.spec = function_spec(
            "search",
            "Search the video's captions and subtitles; returns matches with their times.",
            {
                "query": {"type": "string"},
                "k": {"type": "integer", "minimum": 1, "maximum": max_results},
            },
            ["query"],
        )

    def reset(self, task: Any) -> None:
        self.video = getattr(task, "video_id", None) or None

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        query = str(arguments["query"]).strip()
        if not query:
            raise ToolError("the query is empty")
        hits = self.index.search(query, int(arguments.get("k") or self.max_results), video=self.video)
        if not hits:
            return f"No results for {query!r}."
        lines = []
        for h in hits:
            span = (
                f" {h.doc.start:.1f}-{h.doc.end:.1f}s"
                if h.doc.start is not None and h.doc.end is not None
                else ""
            )
            lines.append(f"[{h.doc.source or 'text'}{span}] {h.doc.text}")
        return "\n".join(lines)

    def close(self) -> None:
        pass


class PythonTool:
    """A code cell in the sandbox (keye.agent.sandbox); cells of one episode share a scratch directory."""

    name = "python"

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.scratch: Path | None = None
        self.spec = function_spec(
            "python",
            f"Run Python (numpy, {self.limits.time_s:g} s); prints the last line's value.",
            {"code": {"type": "string"}},
            ["code"],
        )

    def reset(self, task: Any) -> None:
        self.close()
        self.scratch = Path(tempfile.mkdtemp(prefix="keye-agent-"))

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        if self.scratch is None:
            self.reset(None)
        return run_cell(str(arguments["code"]), self.scratch, self.limits).text()

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
