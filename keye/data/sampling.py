"""The frame-sampling policy: which frames of a clip the model sees, at what size, for how many tokens.

One function (`plan_frames`) decides this for ingest, packing, the loader and training, so token counts agree
everywhere. Follows qwen-vl-utils' `smart_nframes` / video resize rules (fps 2, 4..768 frames, even count, sides a
multiple of 28, per-frame pixel bounds, a total budget), Keye-VL-2.0's duration-scaled pixel budget
(REFERENCE.md section 1, 3rd-party: 256 s -> 0.125x ... 2048 s -> 1.0x) and Keye-VL-1.5's SlowFast encoding.
Deviation from qwen-vl-utils: Keye's ViT has no temporal patch (each frame is its own token grid), so the total
budget is divided by the number of frames, not by frames/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keye.model.vision_tokens import (
    FACTOR,
    PATCH,
    fast_frame_size,
    frame_tokens,
    smart_resize,
    tokens_to_pixels,
)


class SamplingPolicy(BaseModel):
    """Validated settings of the frame plan: qwen-vl-utils' video defaults plus Keye-VL-2.0's duration-scaled
    budget (turn `duration_scaling` off for the plain qwen-vl-utils rules). `slowfast`, `fast_ratio` and
    `slowfast_threshold` are read by callers of `mark_slowfast` / `slowfast_tokens`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fps: float = Field(2.0, gt=0, description="target sampling rate (frames per second of video)")
    min_frames: int = Field(4, ge=1)
    max_frames: int = Field(768, ge=1)
    frame_factor: int = Field(2, ge=1, description="frame count is a multiple of this (2 = even)")
    min_tokens_per_frame: int = Field(128, ge=1)
    max_tokens_per_frame: int = Field(768, ge=1)
    total_token_budget: int = Field(
        115_200,
        ge=1,
        description="visual tokens for the whole clip at full scale (qwen-vl-utils: 128000*0.9)",
    )
    duration_scaling: bool = Field(True, description="scale the total budget with duration (Keye-VL-2.0)")
    full_budget_duration_s: float = Field(2048.0, gt=0, description="duration that gets the full budget")
    min_budget_scale: float = Field(0.125, gt=0, le=1, description="budget scale floor for short clips")
    slowfast: bool = False
    fast_ratio: float = Field(
        0.3, gt=0, le=1, description="fast-frame tokens as a fraction of slow (Keye-1.5)"
    )
    slowfast_threshold: float = Field(
        0.95, ge=0, le=1, description="patch similarity above which a frame is fast"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SamplingPolicy:
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) > max_frames ({self.max_frames})")
        if self.max_frames < self.frame_factor:
            raise ValueError(f"max_frames ({self.max_frames}) < frame_factor ({self.frame_factor})")
        if self.min_tokens_per_frame > self.max_tokens_per_frame:
            raise ValueError(
                f"min_tokens_per_frame ({self.min_tokens_per_frame}) > max_tokens_per_frame "
                f"({self.max_tokens_per_frame})"
            )
        floor_frames = _ceil_to(self.min_frames, self.frame_factor)
        smallest_budget = self.total_token_budget * (self.min_budget_scale if self.duration_scaling else 1.0)
        if floor_frames * self.min_tokens_per_frame > smallest_budget:
            raise ValueError(
                f"total_token_budget {self.total_token_budget} (x{self.min_budget_scale if self.duration_scaling else 1.0}"
                f" for short clips) cannot hold min_frames {floor_frames} x min_tokens_per_frame "
                f"{self.min_tokens_per_frame}"
            )
        return self

    def budget_for(self, duration: float) -> int:
        """Total visual-token budget of a clip of `duration` seconds."""
        if not self.duration_scaling:
            return self.total_token_budget
        scale = min(1.0, max(self.min_budget_scale, duration / self.full_budget_duration_s))
        return int(self.total_token_budget * scale)


@dataclass(frozen=True)
class FramePlan:
    """Frames to decode (seconds from clip start) and the size every (slow) frame is resized to."""

    timestamps: list[float]
    height: int
    width: int
    tokens_per_frame: int
    total_tokens: int

    @property
    def n_frames(self) -> int:
        return len(self.timestamps)


@dataclass(frozen=True)
class SlowFastTokens:
    """Per-frame sizes and token counts once frames are marked slow/fast."""

    sizes: list[tuple[int, int]]
    tokens: list[int]
    total_tokens: int


def _ceil_to(x: float, f: int) -> int:
    return int(math.ceil(x / f) * f)


def _floor_to(x: float, f: int) -> int:
    return int(math.floor(x / f) * f)


def _size_within(height: int, width: int, max_tokens: int) -> tuple[int, int]:
    """Largest 28-aligned size (aspect kept) of at most `max_tokens` tokens; at least one token."""
    return smart_resize(height, width, min_pixels=FACTOR * FACTOR, max_pixels=tokens_to_pixels(max_tokens))


def plan_frames(
    duration: float, width: int, height: int, policy: SamplingPolicy, video_fps: float | None = None
) -> FramePlan:
    """Plan the frames of a clip: count from fps within [min,max] frames (a multiple of frame_factor), size by
    smart_resize within the per-frame token bounds and the (duration-scaled) total budget.

    Timestamps are uniform, `i * duration / n` (frame 0 at 0 s); with `video_fps` they snap to real frame times
    and the count never exceeds the frames the clip has (but stays >= frame_factor; repeats are allowed then).
    """
    if not duration > 0 or not math.isfinite(duration):
        raise ValueError(f"duration must be a positive number of seconds, got {duration}")
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    p = policy
    ff = p.frame_factor
    min_n = _ceil_to(p.min_frames, ff)
    max_n = _floor_to(p.max_frames, ff)
    if video_fps:
        available = max(1, int(math.floor(duration * video_fps + 1e-6)))
        max_n = max(ff, min(max_n, _floor_to(available, ff)))
        min_n = min(min_n, max_n)
    n = min(max(duration * p.fps, min_n), max_n)
    n = max(ff, _floor_to(n, ff))

    budget = p.budget_for(duration)
    if n * p.min_tokens_per_frame > budget:  # too many frames for the budget: fewer frames, never below min
        n = max(min_n, _floor_to(budget // p.min_tokens_per_frame, ff))
    per_frame = max(p.min_tokens_per_frame, min(p.max_tokens_per_frame, budget // n))
    # qwen-vl-utils resize: small frames are scaled up to the per-frame minimum, large ones down to the cap
    h, w = smart_resize(
        height,
        width,
        min_pixels=tokens_to_pixels(p.min_tokens_per_frame),
        max_pixels=tokens_to_pixels(per_frame),
    )
    tokens = frame_tokens(h, w)
    if tokens < p.min_tokens_per_frame:  # rounding down to 28 fell below the minimum: next size up
        for extra in range(1, 4 * p.min_tokens_per_frame + 64):
            h2, w2 = _size_within(height, width, per_frame + extra)
            if frame_tokens(h2, w2) >= p.min_tokens_per_frame:
                h, w = h2, w2
                break
        tokens = frame_tokens(h, w)
    if tokens > per_frame:  # over the share of the budget: fewer frames if allowed, else a smaller frame
        n2 = _floor_to(budget // tokens, ff)
        if tokens <= p.max_tokens_per_frame and n2 >= min_n:
            n = min(n, n2)
        else:
            h, w = _size_within(height, width, per_frame)
            tokens = frame_tokens(h, w)

    step = duration / n
    times = [i * step for i in range(n)]
    if video_fps:
        last = max(0.0, (math.floor(duration * video_fps + 1e-6) - 1) / video_fps)
        times = [min(round(t * video_fps) / video_fps, last) for t in times]
    return FramePlan(timestamps=times, height=h, width=w, tokens_per_frame=tokens, total_tokens=n * tokens)


def _patch_means(gray: np.ndarray, patch: int) -> np.ndarray:
    h, w = gray.shape
    gh, gw = max(1, h // patch), max(1, w // patch)
    ph, pw = h // gh, w // gw
    g = gray[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw)
    return g.mean(axis=(1, 3))


def mark_slowfast(
    frames: np.ndarray, threshold: float = 0.95, patch: int = PATCH, patch_tolerance: float = 8.0
) -> list[bool]:
    """Keye-VL-1.5 SlowFast marking: True = fast frame (nearly identical to the last slow frame).

    A patch counts as unchanged when its mean grey level moved by at most `patch_tolerance` (0..255); a frame is
    fast when the share of unchanged patches is >= `threshold`. The first frame is always slow.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N,H,W,3], got shape {frames.shape}")
    if len(frames) == 0:
        return []
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    flags = [False]
    slow = _patch_means(frames[0].astype(np.float32) @ weights, patch)
    for f in frames[1:]:
        cur = _patch_means(f.astype(np.float32) @ weights, patch)
        similar = float(np.mean(np.abs(cur - slow) <= patch_tolerance))
        is_fast = similar >= threshold
        flags.append(is_fast)
        if not is_fast:
            slow = cur
    return flags


def slowfast_tokens(plan: FramePlan, fast_flags: list[bool], fast_ratio: float = 0.3) -> SlowFastTokens:
    """Sizes and tokens once fast frames shrink to about `fast_ratio` of a slow frame's tokens."""
    if len(fast_flags) != plan.n_frames:
        raise ValueError(f"{len(fast_flags)} flags for a plan of {plan.n_frames} frames")
    fast_size = fast_frame_size(plan.height, plan.width, fast_ratio)
    fast_tok = frame_tokens(*fast_size)
    sizes = [fast_size if f else (plan.height, plan.width) for f in fast_flags]
    tokens = [fast_tok if f else plan.tokens_per_frame for f in fast_flags]
    return SlowFastTokens(sizes=sizes, tokens=tokens, total_tokens=sum(tokens))
