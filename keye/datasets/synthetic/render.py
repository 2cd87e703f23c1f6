"""Rendering a spec to frames and encoding them (H.264 / MPEG-4 / VP9 in mp4 / mkv / webm)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np

from keye.datasets.synthetic.spec import (
    COLORS,
    VideoSpec,
)


def shape_mask(shape: str, r: int) -> np.ndarray:
    """Boolean mask (2r+1 square) of a shape of radius r."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    if shape == "circle":
        return xx**2 + yy**2 <= r * r
    if shape == "square":
        return (np.abs(xx) <= 0.8 * r) & (np.abs(yy) <= 0.8 * r)
    if shape == "triangle":
        return (yy <= 0.8 * r) & (yy >= -r + 2 * np.abs(xx) * 0.95)
    if shape == "diamond":
        return np.abs(xx) + np.abs(yy) <= r
    if shape == "cross":
        return ((np.abs(xx) <= 0.3 * r) | (np.abs(yy) <= 0.3 * r)) & (np.abs(xx) <= r) & (np.abs(yy) <= r)
    if shape == "ring":
        d = xx**2 + yy**2
        return (d <= r * r) & (d >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape}")


class _Background:
    """A tileable smooth texture per scene, scrolled every frame, plus recycled grain so the codec has work."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, n_scenes: int, period: int = 64):
        self.period = period
        self.w, self.h = width, height
        self.tiles = []
        self.vel = []
        prev_mean: np.ndarray | None = None
        for _ in range(n_scenes):
            for _attempt in range(50):  # consecutive scenes must look clearly different (a real cut)
                # muted, near-grey tints: the objects are the only saturated colours, so "which colour can be
                # seen" has one answer; scenes still differ clearly in brightness
                base = np.clip(rng.uniform(40, 190) + rng.integers(-18, 19, size=3), 0, 255).astype(
                    np.float32
                )
                alt = np.clip(base + rng.uniform(-50, 50) + rng.integers(-12, 13, size=3), 0, 255)
                alt = alt.astype(np.float32)
                mean = (base + alt) / 2
                if prev_mean is None or float(np.abs(mean - prev_mean).sum()) >= 150:
                    break
            prev_mean = mean
            grid = rng.random((8, 8)).astype(np.float32)
            # periodic bilinear upsampling of the 8x8 grid to a period x period tile
            u = np.arange(period, dtype=np.float32) * 8 / period
            i0 = np.floor(u).astype(int)
            f = u - i0
            i1 = (i0 + 1) % 8
            rows = grid[i0] * (1 - f)[:, None] + grid[i1] * f[:, None]
            tile = rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]
            img = base[None, None, :] * (1 - tile[..., None]) + alt[None, None, :] * tile[..., None]
            reps_y = math.ceil(height / period) + 1
            reps_x = math.ceil(width / period) + 1
            self.tiles.append(np.tile(img, (reps_y, reps_x, 1)).astype(np.int16))
            speed = rng.uniform(0.5, 2.0)
            angle = rng.uniform(0, 2 * math.pi)
            self.vel.append((speed * math.cos(angle), speed * math.sin(angle)))
        self.grain = rng.integers(-10, 11, size=(6, height, width, 1), dtype=np.int16)

    def frame(self, scene: int, k: int) -> np.ndarray:
        vx, vy = self.vel[scene]
        ox = int(k * vx) % self.period
        oy = int(k * vy) % self.period
        img = self.tiles[scene][oy : oy + self.h, ox : ox + self.w] + self.grain[k % len(self.grain)]
        return img


def render_frame(spec: VideoSpec, bg: _Background, k: int, masks: dict) -> np.ndarray:
    """Frame k as uint8 [H, W, 3], upright (display orientation)."""
    t = k / spec.fps
    scene = sum(1 for c in spec.cuts if t >= c - 1e-9)
    img = bg.frame(scene, k).copy()
    short = min(spec.width, spec.height)
    for obj in spec.objects:
        if not (obj.t_in - 1e-9 <= t < obj.t_out - 1e-9):
            continue
        r = max(3, int(round(obj.radius_at(t) * short)))
        key = (obj.shape, r)
        if key not in masks:
            masks[key] = shape_mask(obj.shape, r)
        m = masks[key]
        x, y = obj.pos_at(t)
        cx, cy = int(round(x * spec.width)), int(round(y * spec.height))
        y0, x0 = cy - r, cx - r
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(spec.height, y0 + 2 * r + 1), min(spec.width, x0 + 2 * r + 1)
        if ye <= ys or xe <= xs:
            continue
        sub = m[ys - y0 : ye - y0, xs - x0 : xe - x0]
        img[ys:ye, xs:xe][sub] = COLORS[obj.color_at(t)]
    return np.clip(img, 0, 255).astype(np.uint8)


_YUV = (
    np.array(
        [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=np.float32
    )
    / 255.0
)


def _rgb_to_yuv420p(img: np.ndarray) -> np.ndarray:
    """BT.601 limited-range conversion in numpy: bit-reproducible, unlike the encoder-side swscale path here."""
    h, w = img.shape[:2]
    f = img.astype(np.float32)
    y = np.clip(f @ _YUV[0] + 16.5, 0, 255).astype(np.uint8)
    sub = (
        f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]
    ) * 0.25  # chroma is linear: average first
    c = np.clip(sub @ _YUV[1:].T + 128.5, 0, 255).astype(np.uint8)
    planes = np.concatenate([y.ravel(), c[..., 0].ravel(), c[..., 1].ravel()])
    return planes.reshape(h * 3 // 2, w)


def expected_frames(spec: VideoSpec, frame_indices: Sequence[int]) -> np.ndarray:
    """The upright frames the encoder was given (before compression), uint8 [N, H, W, 3]: ground truth for tests."""
    bg = _Background(np.random.default_rng(spec.seed), spec.width, spec.height, n_scenes=len(spec.cuts) + 1)
    masks: dict = {}
    return np.stack([render_frame(spec, bg, k, masks) for k in frame_indices])


def encode_video(spec: VideoSpec, path: Path) -> None:
    """Render and encode; the file appears under its final name only when complete."""
    rng = np.random.default_rng(spec.seed)
    bg = _Background(rng, spec.width, spec.height, n_scenes=len(spec.cuts) + 1)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    stored_w, stored_h = (
        (spec.height, spec.width) if spec.rotation in (90, 270) else (spec.width, spec.height)
    )
    masks: dict = {}
    # bitexact: no random Matroska segment UID nor library version in the file (mkv/webm differed run to run)
    with av.open(str(tmp), mode="w", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(spec.codec, rate=spec.fps)
        stream.width, stream.height = stored_w, stored_h
        stream.pix_fmt = "yuv420p"
        # reproducible output: one encoder thread (parallelism is across videos) and, for x264, no macroblock-tree
        # rate control, which gave run-to-run differences with this build
        opts = {**spec.options, "g": str(spec.gop), "threads": "1"}
        if spec.codec == "libx264":
            opts["x264-params"] = ":".join(filter(None, [opts.get("x264-params", ""), "mbtree=0"]))
        stream.options = opts
        if spec.rotation:
            stream.set_display_rotation(-spec.rotation)  # PyAV takes counter-clockwise degrees
        for k in range(spec.n_frames):
            img = render_frame(spec, bg, k, masks)
            if spec.rotation:
                img = np.ascontiguousarray(np.rot90(img, k=spec.rotation // 90))  # undone by the player
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(img), format="yuv420p")
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
