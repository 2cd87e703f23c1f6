"""The embedded synthetic event-video dataset: coloured shapes that appear, move, change and disappear at known
times over moving, noisy backgrounds, with sidecar annotations (docs/DATA_FORMATS.md section 1).

Why: a default dataset that needs no download, exercises the codec paths (H.264/MPEG-4/VP9, mp4/mkv/webm, rotation,
scene cuts, long low-fps videos) and is learnable from pixels by a tiny model (colour, shape, position, order,
timing). In the spirit of CLEVRER / CATER-style synthetic video QA, written from scratch.
Deterministic by seed: annotations are byte-identical, videos decode to the same frames.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

SCHEMA = "keye.annotations/v1"
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 40),
    "purple": (160, 50, 210),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
MAX_OBJECTS = 3  # shapes in a short video: 1-2 under 6 s, 2-3 otherwise, capped by a set's max_objects
GENERATOR_VERSION = 2  # bump when the same spec renders differently (2: muted backgrounds, larger shapes)
REGIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
DIRECTIONS = ("left", "right", "up", "down")
# (codec, container extension, pixel format, encoder options); weights below pick among them
CODECS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("libx264", "mp4", {"preset": "veryfast", "crf": "26"}),
    ("libx264", "mkv", {"preset": "veryfast", "crf": "26"}),
    ("mpeg4", "mp4", {"qscale": "6"}),
    ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "40", "b": "0"}),
)
CODEC_WEIGHTS = (0.55, 0.15, 0.18, 0.12)
SIZES = (
    (160, 120),
    (192, 144),
    (224, 168),
    (256, 192),
    (320, 240),
    (320, 180),
    (426, 240),
    (480, 270),
    (640, 360),
)
SIZE_WEIGHTS = (0.16, 0.16, 0.16, 0.14, 0.12, 0.1, 0.08, 0.05, 0.03)
FPS_CHOICES = (8, 10, 12, 15, 24, 25, 30)
FPS_WEIGHTS = (0.18, 0.18, 0.16, 0.18, 0.1, 0.1, 0.1)


@dataclass
class ObjectTrack:
    """One shape's life: appears at t_in, moves linearly, optionally changes colour/size once, leaves at t_out."""

    shape: str
    color: str
    t_in: float
    t_out: float
    p0: tuple[float, float]  # normalised (x, y) centre at t_in
    p1: tuple[float, float]  # at t_out
    radius: float  # fraction of min(H, W)
    t_change: float | None = None
    new_color: str | None = None
    t_resize: float | None = None
    resize: float = 1.0  # radius factor after t_resize

    def color_at(self, t: float) -> str:
        return self.new_color if self.t_change is not None and t >= self.t_change else self.color  # type: ignore[return-value]

    def radius_at(self, t: float) -> float:
        return self.radius * (self.resize if self.t_resize is not None and t >= self.t_resize else 1.0)

    def pos_at(self, t: float) -> tuple[float, float]:
        a = 0.0 if self.t_out <= self.t_in else (t - self.t_in) / (self.t_out - self.t_in)
        return (self.p0[0] + a * (self.p1[0] - self.p0[0]), self.p0[1] + a * (self.p1[1] - self.p0[1]))


@dataclass
class VideoSpec:
    """Everything needed to render one video and write its annotations."""

    name: str
    width: int
    height: int
    fps: int
    n_frames: int
    codec: str
    ext: str
    options: dict[str, str]
    gop: int
    rotation: int  # clockwise degrees the player applies (display matrix); content is rendered upright
    seed: int
    split: str
    objects: list[ObjectTrack] = field(default_factory=list)
    cuts: list[float] = field(default_factory=list)  # background changes (scene cuts), seconds
    # the set's cap on shapes per short video (1: "how many" is not a question)
    max_objects: int = MAX_OBJECTS

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.ext}"


def _q(t: float, fps: int) -> float:
    """Snap a time to a frame boundary so every event is visible exactly from that frame on."""
    return round(t * fps) / fps


def _region(p: tuple[float, float]) -> str:
    x, y = p
    if abs(x - 0.5) < 0.17 and abs(y - 0.5) < 0.17:
        return "centre"
    return f"{'top' if y < 0.5 else 'bottom'} {'left' if x < 0.5 else 'right'}"


def _direction(p0: tuple[float, float], p1: tuple[float, float]) -> str:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _make_objects(
    rng: np.random.Generator,
    duration: float,
    fps: int,
    n_objects: int,
    long: bool,
    color_changes: bool = True,
) -> list[ObjectTrack]:
    """Objects with unique (colour, shape) over every phase, so each query names exactly one thing."""
    used: set[tuple[str, str]] = set()
    shapes = list(SHAPES)
    colors = list(COLORS)
    objs: list[ObjectTrack] = []
    slot = duration / n_objects
    for k in range(n_objects):
        distinct = n_objects <= len(shapes)
        for _ in range(100):
            shape = shapes[int(rng.integers(len(shapes)))]
            if distinct and any(o.shape == shape for o in objs):
                continue
            color = colors[int(rng.integers(len(colors)))]
            if (color, shape) not in used:
                break
        used.add((color, shape))
        # staggered entries so the order is well defined; visible for a good part of the video
        lo = k * slot * (0.9 if not long else 1.0)
        t_in = _q(lo + rng.uniform(0.05, 0.35) * slot, fps)
        if long:
            t_out = _q(min(duration - 0.5, t_in + rng.uniform(0.5, 0.9) * slot), fps)
        else:
            t_out = _q(min(duration - 0.2, t_in + max(1.5, rng.uniform(0.4, 0.8) * (duration - t_in))), fps)
        t_out = max(t_out, t_in + 2.0 / fps)
        corner = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5)][int(rng.integers(5))]
        p0 = (corner[0] + rng.uniform(-0.05, 0.05), corner[1] + rng.uniform(-0.05, 0.05))
        d = DIRECTIONS[int(rng.integers(4))]
        step = rng.uniform(0.15, 0.3)
        vec = {"left": (-step, 0.0), "right": (step, 0.0), "up": (0.0, -step), "down": (0.0, step)}[d]
        p1 = (min(0.88, max(0.12, p0[0] + vec[0])), min(0.88, max(0.12, p0[1] + vec[1])))
        if _direction(p0, p1) != d or math.dist(p0, p1) < 0.08:  # clipped at the border: go the other way
            p1 = (min(0.88, max(0.12, p0[0] - vec[0])), min(0.88, max(0.12, p0[1] - vec[1])))
        obj = ObjectTrack(shape, color, t_in, t_out, p0, p1, radius=float(rng.uniform(0.13, 0.18)))
        life = t_out - t_in
        if color_changes and life > 2.0 and rng.random() < 0.55:
            options = [c for c in colors if (c, shape) not in used]
            if options:
                obj.new_color = options[int(rng.integers(len(options)))]
                used.add((obj.new_color, shape))
                obj.t_change = _q(t_in + rng.uniform(0.35, 0.65) * life, fps)
        if life > 2.0 and obj.t_change is None and rng.random() < 0.5:
            obj.resize = float(rng.choice([0.6, 1.5]))
            obj.t_resize = _q(t_in + rng.uniform(0.35, 0.65) * life, fps)
        objs.append(obj)
    return objs


def make_spec(
    index: int,
    seed: int,
    long: bool = False,
    split: str = "train",
    max_objects: int = MAX_OBJECTS,
    color_changes: bool = True,
    **long_kw: float,
) -> VideoSpec:
    """Draw one video's parameters from (seed, index) alone, so any subset regenerates identically.

    `max_objects` caps the shapes of a short video and `color_changes` lets shapes change colour: a set with one
    shape that keeps its colour asks questions whose answer is what the frames show (no telling shapes apart, no
    "at which moment"), which a model trained from scratch for minutes can learn (docs/TRAINING.md)."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    rng = np.random.default_rng([seed, index, 1 if long else 0])
    if long:
        width, height = int(long_kw.get("width", 128)), int(long_kw.get("height", 96))
        fps = int(long_kw.get("fps", 6))
        duration = float(long_kw.get("duration", 600.0))
        codec, ext, opts = CODECS[0]
        opts = {**opts, "preset": "ultrafast"}
        n_obj = max(2, min(24, int(duration / 25)))  # <= 24 keeps every (colour, shape) name unique
        gop = 250
        name = f"evt_long_{index:03d}"
    else:
        width, height = SIZES[int(rng.choice(len(SIZES), p=SIZE_WEIGHTS))]
        fps = int(FPS_CHOICES[int(rng.choice(len(FPS_CHOICES), p=FPS_WEIGHTS))])
        duration = float(rng.uniform(3.0, 9.0) if rng.random() < 0.75 else rng.uniform(9.0, 20.0))
        codec, ext, opts = CODECS[int(rng.choice(len(CODECS), p=CODEC_WEIGHTS))]
        n_obj = min(max_objects, int(rng.integers(1, 3)) if duration < 6 else int(rng.integers(2, 4)))
        gop = int(rng.choice([fps, 2 * fps, 250]))
        name = f"evt_{index:05d}"
    n_frames = max(2, int(round(duration * fps)))
    duration = n_frames / fps
    rotation = 90 if (not long and ext == "mp4" and codec == "libx264" and index % 11 == 7) else 0
    objs = _make_objects(rng, duration, fps, n_obj, long, color_changes)
    cuts: list[float] = []
    if long:
        n_cuts = max(1, int(duration // 90))
        cuts = [_q((k + 1) * duration / (n_cuts + 1) + rng.uniform(-5, 5), fps) for k in range(n_cuts)]
    elif duration >= 6 and rng.random() < 0.35:
        n_cuts = 1 if duration < 12 else 2
        cuts = sorted(
            _q(duration * (k + 1) / (n_cuts + 1) + rng.uniform(-0.5, 0.5), fps) for k in range(n_cuts)
        )
    return VideoSpec(
        name=name,
        width=width,
        height=height,
        fps=fps,
        n_frames=n_frames,
        codec=codec,
        ext=ext,
        options=dict(opts),
        gop=gop,
        rotation=rotation,
        seed=int(rng.integers(2**31)),
        split=split,
        objects=objs,
        cuts=cuts,
        max_objects=MAX_OBJECTS if long else max_objects,
    )


# ----------------------------------------------------------------------------------------------- rendering


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
    with av.open(str(tmp), mode="w") as out:
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


# --------------------------------------------------------------------------------------------- annotations


def _name(color: str, shape: str) -> str:
    return f"{color} {shape}"


def _a(phrase: str) -> str:
    """Indefinite article + phrase ("an orange circle")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _r3(t: float) -> float:
    return round(float(t), 3)


def annotations(spec: VideoSpec) -> dict:
    """The sidecar document (DATA_FORMATS.md section 1) for a spec; pure function of the spec."""
    rng = np.random.default_rng([spec.seed, 7])
    dur = spec.duration
    events: list[dict] = []
    dense: list[dict] = []
    grounding: list[dict] = []
    sentences: list[tuple[float, str]] = []
    for i, o in enumerate(spec.objects):
        first = _name(o.color, o.shape)
        region = _region(o.p0)
        direction = _direction(o.p0, o.p1)
        events.append({"t": _r3(o.t_in), "type": "appear", "object": i, "color": o.color, "shape": o.shape})
        dense.append(
            {
                "start": _r3(o.t_in),
                "end": _r3(min(o.t_out, o.t_in + 1.0)),
                "text": f"{_a(first)} appears at the {region}",
            }
        )
        dense.append({"start": _r3(o.t_in), "end": _r3(o.t_out), "text": f"the {first} moves {direction}"})
        sentences.append((o.t_in, f"{_a(first)} appears at the {region} and moves {direction}"))
        end_color = o.color
        if o.t_change is not None and o.new_color:
            events.append({"t": _r3(o.t_change), "type": "color_change", "object": i, "color": o.new_color})
            dense.append(
                {
                    "start": _r3(o.t_change),
                    "end": _r3(min(o.t_out, o.t_change + 1.0)),
                    "text": f"the {first} turns {o.new_color}",
                }
            )
            sentences.append((o.t_change, f"the {first} turns {o.new_color}"))
            grounding.append(
                {"query": f"{_a(first)} is visible", "start": _r3(o.t_in), "end": _r3(o.t_change)}
            )
            grounding.append(
                {
                    "query": f"{_a(_name(o.new_color, o.shape))} is visible",
                    "start": _r3(o.t_change),
                    "end": _r3(o.t_out),
                }
            )
            grounding.append(
                {
                    "query": f"the {o.shape} turns {o.new_color}",
                    "start": _r3(o.t_change),
                    "end": _r3(o.t_change + 0.5),
                }
            )
            end_color = o.new_color
        else:
            grounding.append({"query": f"{_a(first)} is visible", "start": _r3(o.t_in), "end": _r3(o.t_out)})
        if o.t_resize is not None:
            verb = "grows" if o.resize > 1 else "shrinks"
            now = _name(o.color_at(o.t_resize), o.shape)
            events.append({"t": _r3(o.t_resize), "type": verb, "object": i, "factor": o.resize})
            dense.append(
                {
                    "start": _r3(o.t_resize),
                    "end": _r3(min(o.t_out, o.t_resize + 1.0)),
                    "text": f"the {now} {verb}",
                }
            )
            sentences.append((o.t_resize, f"the {now} {verb}"))
        last = _name(end_color, o.shape)
        events.append({"t": _r3(o.t_out), "type": "disappear", "object": i})
        dense.append(
            {"start": _r3(max(o.t_in, o.t_out - 0.5)), "end": _r3(o.t_out), "text": f"the {last} disappears"}
        )
        sentences.append((o.t_out, f"the {last} disappears"))
    for c in spec.cuts:
        events.append({"t": _r3(c), "type": "scene_cut"})
        dense.append({"start": _r3(c), "end": _r3(min(dur, c + 0.5)), "text": "the background changes"})
        grounding.append({"query": "the background changes", "start": _r3(c), "end": _r3(min(dur, c + 0.5))})
        sentences.append((c, "the background changes"))
    sentences.sort(key=lambda s: s[0])
    dense.sort(key=lambda d: (d["start"], d["end"], d["text"]))
    events.sort(key=lambda e: (e["t"], e["type"]))
    if len(spec.cuts) > 1:  # one query per distinct event: drop the ambiguous repeated background query
        grounding = [g for g in grounding if g["query"] != "the background changes"]
    parts = [s for _, s in sentences]
    caption = (
        (
            parts[0][0].upper()
            + parts[0][1:]
            + ("" if len(parts) == 1 else ", then " + ", then ".join(parts[1:]))
            + "."
        )
        if parts
        else "An empty moving background."
    )
    return {
        "schema": SCHEMA,
        "video": spec.filename,
        "duration": _r3(dur),
        "split": spec.split,
        "caption": caption,
        "dense_captions": dense,
        "grounding": grounding,
        "mcq": _mcqs(spec, rng),
        "events": events,
    }


def _options(rng: np.random.Generator, answer: str, pool: Sequence[str], n: int) -> tuple[list[str], int]:
    others = [p for p in pool if p != answer]
    picked = [others[i] for i in rng.permutation(len(others))[: n - 1]]
    opts = [answer, *picked]
    order = rng.permutation(len(opts))
    opts = [opts[i] for i in order]
    return opts, opts.index(answer)


def _mcqs(spec: VideoSpec, rng: np.random.Generator) -> list[dict]:
    """4- and 8-option questions with their evidence intervals; every answer is visible in the pixels."""
    dur = spec.duration
    combos = [_name(c, s) for c in COLORS for s in SHAPES]
    qs: list[dict] = []

    def add(
        question: str, answer: str, pool: Sequence[str], n: int, start: float, end: float, kind: str
    ) -> None:
        opts, idx = _options(rng, answer, pool, n)
        qs.append(
            {
                "question": question,
                "options": opts,
                "answer": int(idx),
                "start": _r3(start),
                "end": _r3(end),
                "kind": kind,
            }
        )

    shape_count = {s: sum(o.shape == s for o in spec.objects) for s in SHAPES}
    turned = [o.new_color for o in spec.objects if o.new_color]
    for o in spec.objects:
        ev_end = min(o.t_out, o.t_in + 1.0)
        if shape_count[o.shape] == 1:
            add(
                f"What colour is the {o.shape} when it appears?",
                o.color,
                list(COLORS),
                4,
                o.t_in,
                ev_end,
                "color",
            )
        add(
            f"Where does the {_name(o.color, o.shape)} appear?",
            _region(o.p0),
            REGIONS,
            4,
            o.t_in,
            ev_end,
            "position",
        )
        add(
            f"Which way does the {_name(o.color, o.shape)} move?",
            _direction(o.p0, o.p1),
            DIRECTIONS,
            4,
            o.t_in,
            o.t_out,
            "motion",
        )
        if o.t_change is not None and o.new_color and turned.count(o.new_color) == 1:
            add(
                f"Which object turns {o.new_color}?",
                _name(o.color, o.shape),
                [c for c in combos if not c.startswith(o.new_color + " ")],
                8,
                max(o.t_in, o.t_change - 1.0),
                min(o.t_out, o.t_change + 1.0),
                "change",
            )
    if spec.objects:
        first = min(spec.objects, key=lambda o: o.t_in)
        second = sorted(o.t_in for o in spec.objects)[1] if len(spec.objects) > 1 else first.t_out
        add(
            "Which object appears first?",
            _name(first.color, first.shape),
            combos,
            8,
            0.0,
            min(dur, max(second, first.t_in + 1.0)),
            "order",
        )
        n = len(spec.objects)
        pool = [str(i) for i in range(max(1, n - 5), max(9, n + 6))]  # numbers around the answer
        if spec.max_objects > 1:  # with one shape per video the count is known without looking
            add("How many shapes appear in the video?", str(n), pool, 8 if n > 3 else 4, 0.0, dur, "count")
        # Perception: one thing that is in the video against ones that never are (no binding, no timing needed).
        seen_colors = {o.color for o in spec.objects} | {o.new_color for o in spec.objects if o.new_color}
        absent_colors = [c for c in COLORS if c not in seen_colors]
        absent_shapes = [s for s in SHAPES if all(o.shape != s for o in spec.objects)]
        asked: set[str] = set()
        for o in spec.objects:
            # one shape: "which colour" is the colour question again, so only ask it with several shapes
            if len(spec.objects) > 1 and len(absent_colors) >= 3 and o.color not in asked:
                asked.add(o.color)
                until = o.t_change if o.t_change is not None else o.t_out
                add(
                    "Which colour can be seen in the video?",
                    o.color,
                    [o.color, *absent_colors],
                    4,
                    o.t_in,
                    until,
                    "color_presence",
                )
            if len(absent_shapes) >= 3 and o.shape not in asked:
                asked.add(o.shape)
                add(
                    "Which shape can be seen in the video?",
                    o.shape,
                    [o.shape, *absent_shapes],
                    4,
                    o.t_in,
                    o.t_out,
                    "shape_presence",
                )
    return qs


# ------------------------------------------------------------------------------------------------ dataset


def _heldout(n: int, seed: int, fraction: float) -> set[int]:
    if n < 3 or fraction <= 0:  # 0: a train-only set (e.g. a second source that adds training videos)
        return set()
    k = max(1, int(round(n * fraction)))
    rng = np.random.default_rng([seed, 99])
    return {int(i) for i in rng.permutation(n)[:k]}


def _write_one(args: tuple[VideoSpec, str]) -> str:
    spec, out_dir = args
    path = Path(out_dir) / spec.filename
    encode_video(spec, path)
    return str(path)


def dataset_specs(
    n_videos: int = 40,
    n_long: int = 1,
    seed: int = 0,
    heldout_fraction: float = 0.175,
    long_duration: float = 600.0,
    long_size: tuple[int, int] = (128, 96),
    long_fps: int = 6,
    max_objects: int = MAX_OBJECTS,
    color_changes: bool = True,
) -> list[VideoSpec]:
    """The specs of a dataset (no files); the long videos always belong to the train split (and keep their many
    shapes and changes: they exist for long-context work)."""
    held = _heldout(n_videos, seed, heldout_fraction)
    specs = [
        make_spec(
            i,
            seed,
            split="heldout" if i in held else "train",
            max_objects=max_objects,
            color_changes=color_changes,
        )
        for i in range(n_videos)
    ]
    for j in range(n_long):
        specs.append(
            make_spec(
                j,
                seed,
                long=True,
                width=long_size[0],
                height=long_size[1],
                fps=long_fps,
                duration=long_duration,
            )
        )
    return specs


def generate_dataset(
    out_dir: str | os.PathLike[str],
    n_videos: int = 40,
    n_long: int = 1,
    seed: int = 0,
    *,
    heldout_fraction: float = 0.175,
    long_duration: float = 600.0,
    long_size: tuple[int, int] = (128, 96),
    long_fps: int = 6,
    workers: int | None = None,
    max_objects: int = MAX_OBJECTS,
    color_changes: bool = True,
) -> list[Path]:
    """Write videos + `<stem>.json` sidecars into `out_dir`; returns the video paths (short ones, then long).

    Existing complete files are kept (a re-run only fills what is missing); annotations are always rewritten
    (atomically) because they are cheap and must match the seed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = dataset_specs(
        n_videos,
        n_long,
        seed,
        heldout_fraction,
        long_duration,
        long_size,
        long_fps,
        max_objects=max_objects,
        color_changes=color_changes,
    )
    for spec in specs:
        doc = json.dumps(annotations(spec), indent=1, sort_keys=False) + "\n"
        tmp = out / f".{spec.name}.json.tmp"
        tmp.write_text(doc)
        os.replace(tmp, out / f"{spec.name}.json")
    todo = [(s, str(out)) for s in specs if not (out / s.filename).exists()]
    todo.sort(key=lambda a: -a[0].n_frames * a[0].width * a[0].height)  # longest first balances the pool
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n_workers <= 1 or len(todo) <= 1:
        for item in todo:
            _write_one(item)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            list(pool.map(_write_one, todo))
    return [out / s.filename for s in specs]


# ------------------------------------------------------------------------------------------- bad inputs


def _top_level_boxes(data: bytes) -> list[tuple[str, int, int]]:
    """(type, offset, size) of the top-level MP4 boxes."""
    boxes = []
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        if size < 8:
            break
        boxes.append((kind, pos, size))
        pos += size
    return boxes


def _small_video(
    path: Path,
    seconds: float,
    fps: int = 10,
    size: tuple[int, int] = (160, 120),
    gop: int = 10,
    seed: int = 1,
    **container_opts: str,
) -> None:
    spec = VideoSpec(
        name=path.stem,
        width=size[0],
        height=size[1],
        fps=fps,
        n_frames=max(1, int(round(seconds * fps))),
        codec="libx264",
        ext=path.suffix.lstrip("."),
        options={"preset": "ultrafast", "crf": "18"},
        gop=gop,
        rotation=0,
        seed=seed,
        split="train",
        objects=[ObjectTrack("circle", "red", 0.0, seconds, (0.3, 0.3), (0.7, 0.6), 0.15)],
    )
    if container_opts:
        tmp = path.with_name(f".{path.stem}.plain{path.suffix}")
        encode_video(spec, tmp)
        with av.open(str(tmp)) as src, av.open(str(path), "w", options=container_opts) as dst:
            s_in = src.streams.video[0]
            s_out = dst.add_stream_from_template(s_in)
            for packet in src.demux(s_in):
                if packet.dts is None:
                    continue
                packet.stream = s_out
                dst.mux(packet)
        tmp.unlink()
    else:
        encode_video(spec, path)


def corrupt_examples(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Bad inputs for tests, by kind: zero_bytes, truncated, truncated_faststart, not_video, audio_only,
    too_short, undecodable (payload bytes overwritten mid-file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    p = out / "zero_bytes.mp4"
    p.write_bytes(b"")
    paths["zero_bytes"] = p

    full = out / ".full.mp4"
    _small_video(full, 4.0)
    data = full.read_bytes()
    p = out / "truncated.mp4"  # moov (the index) is at the end: cut it off
    p.write_bytes(data[: len(data) * 6 // 10])
    paths["truncated"] = p

    fs = out / ".faststart.mp4"
    _small_video(fs, 4.0, movflags="faststart")
    data_fs = fs.read_bytes()
    p = out / "truncated_faststart.mp4"  # index intact at the front, the last 60% of the frames missing
    p.write_bytes(data_fs[: len(data_fs) * 4 // 10])
    paths["truncated_faststart"] = p
    fs.unlink()

    p = out / "not_video.mp4"
    p.write_text("This is a text file that someone named .mp4\nIt contains no video at all.\n")
    paths["not_video"] = p

    p = out / "audio_only.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        t = np.arange(16000 * 2) / 16000
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        for i in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, i : i + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate = 16000
            frame.pts = i
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    paths["audio_only"] = p

    p = out / "too_short.mp4"
    _small_video(p, 0.2)
    paths["too_short"] = p

    big = out / ".undecodable_src.mp4"
    _small_video(big, 6.0, fps=10, size=(320, 240), gop=5)
    data = bytearray(big.read_bytes())
    mdat = [b for b in _top_level_boxes(bytes(data)) if b[0] == "mdat"]
    lo, size = (mdat[0][1] + 8, mdat[0][2] - 8) if mdat else (0, len(data))
    rng = np.random.default_rng(5)
    a, b = lo + int(size * 0.3), lo + int(size * 0.95)
    data[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    p = out / "undecodable.mp4"
    p.write_bytes(bytes(data))
    paths["undecodable"] = p
    big.unlink()
    full.unlink()
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m keye.datasets.synthetic", description=__doc__.splitlines()[0]
    )
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=40, help="short videos")
    ap.add_argument("--long", type=int, default=1, help="long (10 min) videos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-duration", type=float, default=600.0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--corrupt", action="store_true", help="also write the bad-input examples to OUT_DIR/corrupt"
    )
    a = ap.parse_args(argv)
    paths = generate_dataset(a.out_dir, a.n, a.long, a.seed, long_duration=a.long_duration, workers=a.workers)
    if a.corrupt:
        corrupt_examples(Path(a.out_dir) / "corrupt")
    print(f"wrote {len(paths)} videos to {a.out_dir}")


if __name__ == "__main__":
    main()
