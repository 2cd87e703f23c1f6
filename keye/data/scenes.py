"""Clips by scene cuts: frame differences of small thumbnails at a low analysis rate, then long scenes cut into
pieces no longer than the clip limit.

Follows the content detector of PySceneDetect (mean colour difference between consecutive frames with a fixed
threshold, plus an adaptive check against the local average so steady motion is not taken for a cut) and
NeMo Curator's "split by scene, then cap the clip length" order. Written from scratch on PyAV.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import av
import numpy as np

from keye.data.video import VideoRejected, error_text, open_video, stream_fps


@dataclass(frozen=True)
class SceneCuts:
    """Cut times (seconds: the first frame of each new scene), the video duration and the per-tick scores."""

    cuts: list[float]
    duration: float
    tick_times: list[float]
    scores: list[float]


def _thumb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    return (
        frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
        .to_ndarray()
        .astype(np.int16)
    )


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def detect_cuts(
    path: str | os.PathLike[str],
    threshold: float = 22.0,
    analysis_fps: float = 4.0,
    adaptive_ratio: float = 3.0,
    window_s: float = 2.0,
    thumb_width: int = 64,
) -> SceneCuts:
    """Scene cuts of a video.

    A tick (every 1/analysis_fps s) whose thumbnail differs from the previous tick's by >= `threshold` (mean
    absolute RGB difference, 0..255) and by >= `adaptive_ratio` x the median difference of the ticks within
    `window_s` is a cut; the exact cut frame is then found among the frames decoded since the previous tick
    (kept as references, converted only when a cut is found). Non-reference frames are skipped when the analysis
    rate is well below the frame rate.
    """
    if analysis_fps <= 0:
        raise ValueError("analysis_fps must be positive")
    try:
        container = open_video(path)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoRejected(f"cannot open video: {error_text(e)}") from None
    with container:
        if not container.streams.video:
            raise VideoRejected("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = stream_fps(stream) or 25.0
        if analysis_fps * 2 < fps:
            stream.codec_context.skip_frame = "NONREF"
        ctx = stream.codec_context
        tw = thumb_width
        th = max(8, int(round(thumb_width * ctx.height / max(1, ctx.width))))
        tb = stream.time_base
        t0 = stream.start_time or 0
        step = 1.0 / analysis_fps

        tick_times: list[float] = []
        scores: list[float] = []
        candidates: list[tuple[int, list[tuple[float, av.VideoFrame]], np.ndarray]] = []
        prev_thumb: np.ndarray | None = None
        between: list[tuple[float, av.VideoFrame]] = []
        next_tick = 0.0
        last_t = 0.0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float((frame.pts - t0) * tb)
                last_t = max(last_t, t)
                if t + 0.5 / fps < next_tick:
                    between.append((t, frame))
                    continue
                thumb = _thumb(frame, tw, th)
                if prev_thumb is not None:
                    s = _diff(thumb, prev_thumb)
                    if s >= threshold:
                        candidates.append((len(scores), [*between, (t, frame)], prev_thumb))
                    scores.append(s)
                    tick_times.append(t)
                prev_thumb = thumb
                between = []
                while next_tick <= t + 0.5 / fps:
                    next_tick += step
        except av.error.FFmpegError as e:
            raise VideoRejected(f"undecodable frames near t~{last_t:.1f} s: {error_text(e)}") from None
        duration = last_t + 1.0 / fps

        cuts: list[float] = []
        half = max(1, int(round(window_s * analysis_fps / 2)))
        arr = np.asarray(scores, dtype=np.float64)
        for i, frames, before in candidates:
            lo, hi = max(0, i - half), min(len(arr), i + half + 1)
            around = np.concatenate([arr[lo:i], arr[i + 1 : hi]])
            local = float(np.median(around)) if around.size else 0.0
            if arr[i] < adaptive_ratio * max(local, 1e-6):
                continue
            # exact frame: the first one that looks more like the new scene than the old one
            after = _thumb(frames[-1][1], tw, th)
            cut_t = frames[-1][0]
            for ft, fr in frames:
                th_ = _thumb(fr, tw, th)
                if _diff(th_, before) > _diff(th_, after):
                    cut_t = ft
                    break
            cuts.append(cut_t)
        return SceneCuts(cuts=cuts, duration=duration, tick_times=tick_times, scores=scores)


def split_scenes(
    cuts: list[float], duration: float, max_clip_s: float, min_clip_s: float = 0.0
) -> list[tuple[float, float]]:
    """Scenes from cut times, scenes shorter than `min_clip_s` merged into a neighbour, then every scene longer
    than `max_clip_s` split into equal pieces no longer than it. Pieces tile [0, duration] without gaps."""
    if max_clip_s <= 0:
        raise ValueError("max_clip_s must be positive")
    if min_clip_s > max_clip_s:
        raise ValueError(f"min_clip_s ({min_clip_s}) > max_clip_s ({max_clip_s})")
    if duration <= 0:
        return []
    bounds = [0.0] + sorted(c for c in set(cuts) if 0.0 < c < duration) + [duration]
    scenes = [[bounds[i], bounds[i + 1]] for i in range(len(bounds) - 1)]
    merged: list[list[float]] = []
    for s in scenes:
        if merged and (s[1] - s[0] < min_clip_s or merged[-1][1] - merged[-1][0] < min_clip_s):
            merged[-1][1] = s[1]  # a short scene joins the previous one (or absorbs a short first one)
        else:
            merged.append(list(s))
    clips: list[tuple[float, float]] = []
    for a, b in merged:
        n = max(1, math.ceil((b - a) / max_clip_s - 1e-9))
        edges = [a + (b - a) * k / n for k in range(n + 1)]
        clips.extend((round(edges[k], 6), round(edges[k + 1], 6)) for k in range(n))
    return clips


def detect_clips(
    path: str | os.PathLike[str],
    max_clip_s: float = 20.0,
    min_clip_s: float = 1.0,
    threshold: float = 22.0,
    analysis_fps: float = 4.0,
) -> list[tuple[float, float]]:
    """Clips (start, end) in seconds: scene cuts, short scenes merged, long scenes cut to <= max_clip_s."""
    sc = detect_cuts(path, threshold=threshold, analysis_fps=analysis_fps)
    return split_scenes(sc.cuts, sc.duration, max_clip_s, min_clip_s)
