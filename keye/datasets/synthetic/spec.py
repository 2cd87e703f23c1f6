"""What a synthetic video is: its objects, their tracks and colours, codec and size, all drawn from a seed
(the spec renders and annotates deterministically)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
# bump when the same spec renders differently (2: muted backgrounds, larger shapes; 3: bit-exact containers;
# 4: a lone shape lives anywhere in the video)
GENERATOR_VERSION = 4
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
        if long:
            t_in = _q(lo + rng.uniform(0.05, 0.35) * slot, fps)
            t_out = _q(min(duration - 0.5, t_in + rng.uniform(0.5, 0.9) * slot), fps)
        elif n_objects == 1:
            # a lone shape lives anywhere in the video for 20-60% of it: where it is cannot be told from the
            # video's length (a span proportional to the length grounds it at mIoU ~53, the frames' bracket ~70;
            # bench/grounding_oracles.py)
            life = min(duration - 0.2, max(1.5, rng.uniform(0.2, 0.6) * duration))
            t_in = _q(rng.uniform(0.0, max(0.0, duration - 0.2 - life)), fps)
            t_out = _q(min(duration - 0.2, t_in + life), fps)
        else:
            t_in = _q(lo + rng.uniform(0.05, 0.35) * slot, fps)
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
