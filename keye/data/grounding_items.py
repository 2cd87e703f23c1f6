"""How a training grounding sample is asked and answered: on the whole clip or on a window of it, with the exact
span or the span its frames bracket (docs/TRAINING.md "A grounding task the tiny model can learn").

Why windows: a clip has one or two grounding queries, so a small set has about a hundred, and a small model
memorises their answers (the query and the clip's length name the clip) long before it learns to read the frames:
trained on the default set's 70 clips it reached 97% of its training mIoU and answered held-out clips no better
than with blank frames (bench/RESULTS.md `## grounding learnability`). A window of the clip moves the event to
another place in another length of video, so the answer must come from the frames. Windows are drawn from the
sample's key with a stable hash, so the pack stage and the loader build the same sample on any machine.

Why the bracket: see frame_span.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keye.core.hashing import stable_hash64

GROUNDING_ANSWERS: tuple[str, ...] = ("exact", "frames")
# A grounding sample's item is `answer * GROUNDING_ANSWER_STRIDE + window * GROUNDING_WINDOW_STRIDE + query`:
# window 0 is the whole clip, window k > 0 the k-th window drawn for that query (grounding_window); answer indexes
# GROUNDING_ANSWERS. An item below GROUNDING_WINDOW_STRIDE is the plain query index, as before windows existed.
GROUNDING_WINDOW_STRIDE = 1000
GROUNDING_ANSWER_STRIDE = 1000 * GROUNDING_WINDOW_STRIDE
MAX_GROUNDING_WINDOWS = 64
MIN_WINDOW_SECONDS = 3.0  # the shortest clip a window makes (the eval's clips are 3-20 s)
MIN_EVENT_SECONDS = 0.3  # of the event that must lie inside a window


@dataclass(frozen=True)
class GroundingItem:
    """A grounding sample's identity (layout above), read and written only here."""

    query: int  # index into the record's grounding list
    window: int = 0  # 0: the whole clip; k > 0: grounding_window(record, query, k)
    answer: int = 0  # index into GROUNDING_ANSWERS

    def encode(self) -> int:
        return self.answer * GROUNDING_ANSWER_STRIDE + self.window * GROUNDING_WINDOW_STRIDE + self.query

    @classmethod
    def decode(cls, item: int) -> GroundingItem:
        answer, rest = divmod(int(item), GROUNDING_ANSWER_STRIDE)
        window, query = divmod(rest, GROUNDING_WINDOW_STRIDE)
        return cls(query, window, answer)


def frame_span(start: float, end: float, timestamps: Sequence[float], duration: float) -> tuple[float, float]:
    """An event's span as the sampled frames bracket it: from the last frame before the first frame that shows it
    (the clip's start if that is frame 0) to the first frame after the last one that shows it (the clip's end if
    none follows). An event between two frames is bracketed by those two.

    Why: a model that sees frames at 1 fps cannot know an event's time to a tenth of a second, only which stamped
    frames show it. Trained on exact times, a small model regresses sub-frame times it cannot see and settles on
    the mean span; trained on the bracket, it copies two of the frame stamps it was shown. The bracket always
    contains the event; on the default set's held-out queries it scores mIoU ~70 against the exact spans, the
    midpoints between the bracketing frames ~80, a span proportional to the video's length ~53."""
    ts = list(timestamps)
    if not ts:
        raise ValueError("frame_span needs the frames' timestamps")
    eps = 1e-6
    first = next((i for i, t in enumerate(ts) if t >= start - eps), None)
    if first is None:  # starts after the last frame
        return ts[-1], float(duration)
    last = max([first - 1] + [i for i, t in enumerate(ts) if t < end - eps])
    lo = ts[first - 1] if first > 0 else ts[0]
    hi = ts[last + 1] if last + 1 < len(ts) else float(duration)
    return lo, hi


def grounding_window(record: dict[str, Any], query: int, window: int) -> tuple[float, float] | None:
    """(start, length) in seconds of window `window` (>= 1) for grounding query `query` of a clip: a length drawn
    in [MIN_WINDOW_SECONDS, duration], a start in [0, duration - length], both whole video frames, redrawn (up to
    16 times) until at least MIN_EVENT_SECONDS of the event (or all of a shorter one) lies inside. None when the
    clip is too short or no draw holds the event."""
    if window < 1:
        raise ValueError(f"window must be >= 1 (0 is the whole clip), got {window}")
    duration = float(record["duration"])
    fps = float(record.get("fps") or 0.0)
    g = record["grounding"][query]
    start, end = float(g["start"]), float(g["end"])
    if duration < MIN_WINDOW_SECONDS or fps <= 0:
        return None
    need = min(MIN_EVENT_SECONDS, max(0.0, end - start))
    rng = np.random.default_rng(stable_hash64(f"{record['key']}:grounding:{query}:window:{window}"))
    for _ in range(16):
        length = float(np.floor(rng.uniform(MIN_WINDOW_SECONDS, duration) * fps) / fps)
        a = float(np.floor(rng.uniform(0.0, duration - length) * fps) / fps)
        if length < 2.0 / fps:
            continue
        inside = min(end, a + length) - max(start, a)
        if inside >= need - 1e-9 and inside > 0:
            return a, length
    return None


def grounding_view(record: dict[str, Any], item: int) -> tuple[dict[str, Any], float]:
    """The record a grounding sample is built from and its start in the clip (seconds): the record itself for the
    whole clip, or a copy cut to the sample's window (duration, the asked query's span shifted and clipped)."""
    it = GroundingItem.decode(item)
    if it.window == 0:
        return record, 0.0
    w = grounding_window(record, it.query, it.window)
    if w is None:
        raise ValueError(f"grounding query {it.query} of {record.get('key')!r} has no window {it.window}")
    a, length = w
    view = copy.copy(record)
    ground = list(record["grounding"])
    g = ground[it.query]
    s, e = max(float(g["start"]), a) - a, min(float(g["end"]), a + length) - a
    ground[it.query] = {**g, "start": round(s, 3), "end": round(e, 3)}
    view["grounding"] = ground
    view["duration"] = length
    return view, a


def grounding_items(record: dict[str, Any], answer: str = "exact", windows: int = 0) -> list[int]:
    """The grounding samples of a clip: each query on the whole clip, then on up to `windows` windows."""
    if answer not in GROUNDING_ANSWERS:
        raise ValueError(f"grounding answer must be one of {GROUNDING_ANSWERS}, got {answer!r}")
    if not 0 <= windows <= MAX_GROUNDING_WINDOWS:
        raise ValueError(f"grounding windows must be in 0..{MAX_GROUNDING_WINDOWS}, got {windows}")
    kind = GROUNDING_ANSWERS.index(answer)
    out: list[int] = []
    for q in range(len(record.get("grounding") or [])):
        out.append(GroundingItem(q, 0, kind).encode())
        out.extend(
            GroundingItem(q, k, kind).encode()
            for k in range(1, windows + 1)
            if grounding_window(record, q, k) is not None
        )
    return out
