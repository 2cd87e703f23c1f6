"""What every captioner takes and returns, and the helpers the model-backed captioners share.

Error policy (one rule for every backend, so the caption flow handles them alike):
- A problem with one clip (no annotation file, nothing in the annotations that describes this clip, frames that
  cannot be decoded, an empty or unusable model answer, a request the server refuses for this clip) gives that clip
  a ``CaptionRecord`` with ``error`` set to a sentence a person understands and an empty caption. The flow records
  it as a rejected caption with that reason and goes on with the rest of the batch.
- A problem with the captioner itself (bad configuration, a model directory that cannot be loaded, an endpoint still
  unreachable or overloaded after every retry) raises ``CaptionerError``: no clip can be captioned, so the task fails
  and Prefect's task retries (or the user) take over.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


class CaptionerError(RuntimeError):
    """The captioner as a whole cannot work (configuration, model loading, endpoint down after retries)."""


class CaptionerUnavailable(CaptionerError):
    """A remote endpoint kept failing (timeouts, 429, 5xx) through every retry."""


@dataclass(frozen=True)
class ClipRef:
    """A clip of a source video: times in seconds from the video start; fps/width/height describe the source
    (width/height in displayed orientation, as ingest probes them)."""

    clip_id: str
    video_path: str
    start: float
    end: float
    fps: float
    width: int
    height: int
    video_id: str = ""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class CaptionRecord:
    """docs/DATA_FORMATS.md section 2: one per clip; times relative to the clip start.

    ``error`` is None for a usable caption, else why this clip has none (see the module docstring).
    ``meta`` holds backend details worth keeping (annotation source and split, frame times, token usage, latency).
    """

    clip_id: str
    backend: str
    model: str
    prompt_version: str
    caption: str = ""
    dense_captions: list[dict[str, Any]] = field(default_factory=list)
    grounding: list[dict[str, Any]] = field(default_factory=list)
    mcq: list[dict[str, Any]] = field(default_factory=list)
    subtitles: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def caption_id(self) -> str:
        """Stable id of this caption version of this clip: the same clip captioned by the same backend, model
        and prompt version gets the same id (what lineage and the shard JSON's ``caption_meta`` carry)."""
        blob = json.dumps([self.clip_id, self.backend, self.model, self.prompt_version])
        return "cap-" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The section-2 dict (plus ``error`` and ``meta``), JSON-serialisable."""
        return asdict(self)

    @classmethod
    def failed(
        cls, clip: ClipRef, backend: str, model: str, prompt_version: str, reason: str
    ) -> CaptionRecord:
        return cls(clip.clip_id, backend, model, prompt_version, error=reason)


@runtime_checkable
class Captioner(Protocol):
    name: str
    model: str
    prompt_version: str

    def caption(self, clips: list[ClipRef]) -> list[CaptionRecord]:
        """One record per clip, in the order given."""
        ...


# ------------------------------------------------------------------ shared by the model-backed captioners
DEFAULT_PROMPT_VERSION = "v1"
DEFAULT_PROMPT = (
    "The images are frames sampled in order from one video clip of {duration:.1f} seconds; each frame is preceded "
    "by its time in seconds from the start of the clip. Describe what happens in the clip. Answer with JSON only, "
    'in this form: {{"caption": "<one paragraph: what is shown and what happens, in order>", '
    '"dense_captions": [{{"start": <seconds>, "end": <seconds>, "text": "<one event>"}}]}}, '
    "with times in seconds from the start of the clip."
)


def prompt_identity(prompt: str | None, prompt_version: str | None) -> tuple[str, str]:
    """(prompt, version): the built-in prompt is ``v1``; a custom prompt without a version is named by its hash,
    so two different prompts never share a version in lineage."""
    if prompt is None:
        return DEFAULT_PROMPT, prompt_version or DEFAULT_PROMPT_VERSION
    return prompt, prompt_version or "custom-" + hashlib.sha256(prompt.encode()).hexdigest()[:8]


def render_prompt(prompt: str, clip: ClipRef) -> str:
    return prompt.format(duration=clip.duration)


def timestamp_text(t: float) -> str:
    """The text placed before each frame (Qwen3-VL / Keye style: '<1.5 seconds>')."""
    return f"<{t:.1f} seconds>"


def sample_clip_frames(
    clip: ClipRef, *, fps: float, min_frames: int, max_frames: int, max_tokens_per_frame: int
) -> tuple[list[float], np.ndarray]:
    """(clip-relative times, frames uint8 [N,H,W,3]) chosen by the project's one frame planner.

    Uses ``keye.data.sampling.plan_frames`` (so the sizes are multiples of 28 and match what training sees) with a
    captioning-sized policy, and ``keye.data.video.decode_frames`` to decode only the frames needed.
    """
    from keye.data.sampling import SamplingPolicy, plan_frames
    from keye.data.video import decode_frames

    policy = SamplingPolicy(
        fps=fps,
        min_frames=min_frames,
        max_frames=max_frames,
        min_tokens_per_frame=min(64, max_tokens_per_frame),
        max_tokens_per_frame=max_tokens_per_frame,
        total_token_budget=max_frames * max_tokens_per_frame,
        duration_scaling=False,
    )
    plan = plan_frames(clip.duration, clip.width, clip.height, policy, video_fps=clip.fps or None)
    frames = decode_frames(
        clip.video_path, [clip.start + t for t in plan.timestamps], size=(plan.height, plan.width)
    )
    return list(plan.timestamps), frames


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def parse_model_answer(text: str, duration: float) -> tuple[str, list[dict[str, Any]], str]:
    """(caption, dense captions, how it was parsed) from a model's answer to the default prompt.

    JSON (possibly in a code fence or surrounded by prose) is used when it holds a non-empty caption; dense
    captions are kept when well-formed and clamped to [0, duration]. Anything else: the whole text is the caption.
    """
    raw = text.strip()
    body = _FENCE.sub("", raw).strip()
    lo, hi = body.find("{"), body.rfind("}")
    if lo >= 0 and hi > lo:
        try:
            obj = json.loads(body[lo : hi + 1])
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("caption"), str) and obj["caption"].strip():
            dense = []
            for d in obj.get("dense_captions") or []:
                try:
                    s, e, t = float(d["start"]), float(d["end"]), str(d["text"]).strip()
                except (KeyError, TypeError, ValueError):
                    continue
                if not (math.isfinite(s) and math.isfinite(e)) or not t:
                    continue
                s, e = min(max(s, 0.0), duration), min(max(e, 0.0), duration)
                if e >= s:
                    dense.append({"start": round(s, 3), "end": round(e, 3), "text": t})
            return obj["caption"].strip(), dense, "json"
    return raw, [], "text"
