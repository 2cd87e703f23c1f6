"""The frame-sampling policy: qwen-vl-utils counting rules, token bounds, budgets, SlowFast marking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from keye.data.sampling import SamplingPolicy, mark_slowfast, plan_frames, slowfast_tokens
from keye.model.vision_tokens import fast_frame_size, frame_tokens

TINY = SamplingPolicy(
    fps=1.0,
    min_frames=4,
    max_frames=16,
    min_tokens_per_frame=4,
    max_tokens_per_frame=16,
    total_token_budget=256,
    duration_scaling=False,
)


def qwen_nframes(total_frames: int, video_fps: float, fps: float = 2.0, lo: int = 4, hi: int = 768) -> int:
    """qwen-vl-utils smart_nframes (fps branch), restated from its documented rules."""
    min_frames = math.ceil(lo / 2) * 2
    max_frames = math.floor(min(hi, total_frames) / 2) * 2
    n = total_frames / video_fps * fps
    n = min(min(max(n, min_frames), max_frames), total_frames)
    return math.floor(n / 2) * 2


def test_default_plan_hand_computed_720p():
    plan = plan_frames(10.0, 1280, 720, SamplingPolicy())
    # 10 s at 2 fps = 20 frames; budget 115200 x 0.125 (short clip) = 14400 -> 720 tokens/frame max;
    # smart_resize(720, 1280, max 720*784 px) = 560 x 980 -> 20 x 35 = 700 tokens
    assert plan.n_frames == 20
    assert (plan.height, plan.width) == (560, 980)
    assert plan.tokens_per_frame == 700 == frame_tokens(560, 980)
    assert plan.total_tokens == 14000
    assert plan.timestamps[:3] == [0.0, 0.5, 1.0] and plan.timestamps[-1] == 9.5


@pytest.mark.parametrize(
    "total,vfps",
    [
        (30, 30.0),
        (90, 30.0),
        (91, 30.0),
        (250, 25.0),
        (37, 12.0),
        (4, 8.0),
        (5, 2.0),
        (100000, 30.0),
        (1501, 6.0),
    ],
)
def test_frame_count_matches_qwen_rules(total, vfps):
    pol = SamplingPolicy(duration_scaling=False, min_tokens_per_frame=4, total_token_budget=10**7)
    plan = plan_frames(total / vfps, 640, 360, pol, video_fps=vfps)
    assert plan.n_frames == qwen_nframes(total, vfps)
    assert plan.n_frames % 2 == 0
    # snapped to real frames, inside the clip, non-decreasing
    assert all(abs(t * vfps - round(t * vfps)) < 1e-6 for t in plan.timestamps)
    assert all(0 <= t < total / vfps for t in plan.timestamps)
    assert plan.timestamps == sorted(plan.timestamps)


def test_min_and_max_frames_and_even_count():
    pol = SamplingPolicy()
    assert plan_frames(0.7, 320, 240, pol).n_frames == 4  # below min: raised to min
    assert plan_frames(3.4, 320, 240, pol).n_frames == 6  # 6.8 -> floor to even
    long = plan_frames(7200.0, 1280, 720, pol)
    assert long.n_frames == 768
    assert long.total_tokens <= pol.budget_for(7200.0)
    # too short to hold min_frames real frames: as many (even) frames as exist
    assert plan_frames(1.5, 320, 240, pol, video_fps=2.0).n_frames == 2


@pytest.mark.parametrize("duration", [0.5, 3.0, 17.3, 120.0, 600.0, 3000.0])
@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (128, 96), (3840, 2160), (640, 100)])
@pytest.mark.parametrize("scaled", [True, False])
def test_invariants(duration, size, scaled):
    pol = SamplingPolicy(duration_scaling=scaled)
    w, h = size
    plan = plan_frames(duration, w, h, pol)
    assert plan.n_frames % 2 == 0 and 4 <= plan.n_frames <= 768
    assert plan.height % 28 == 0 and plan.width % 28 == 0
    assert plan.tokens_per_frame == frame_tokens(plan.height, plan.width)
    assert 128 <= plan.tokens_per_frame <= 768
    assert plan.total_tokens == plan.n_frames * plan.tokens_per_frame <= pol.budget_for(duration)
    # aspect kept within rounding to 28
    assert abs(plan.width / plan.height - w / h) / (w / h) < 0.35


def test_duration_scaled_budget_follows_reference_points():
    pol = SamplingPolicy(total_token_budget=100_000)
    for seconds, scale in [(256, 0.125), (512, 0.25), (1024, 0.5), (2048, 1.0), (5000, 1.0), (10, 0.125)]:
        assert pol.budget_for(seconds) == int(100_000 * scale)
    assert SamplingPolicy(duration_scaling=False, total_token_budget=100_000).budget_for(10) == 100_000
    # a longer video gets more pixels in total but never more frames than max_frames
    a = plan_frames(300.0, 1280, 720, pol)
    b = plan_frames(1500.0, 1280, 720, pol)
    assert b.total_tokens > a.total_tokens


def test_budget_cuts_frames_before_per_frame_minimum():
    pol = SamplingPolicy(total_token_budget=2048, duration_scaling=False)
    plan = plan_frames(100.0, 1280, 720, pol)
    # 128 tokens/frame would allow 16 frames, but 720p rounded to 28-multiples with >= 128 tokens is
    # 252 x 448 = 144 tokens, so 14 frames fit: the budget and the per-frame minimum both hold
    assert (plan.height, plan.width, plan.tokens_per_frame) == (252, 448, 144)
    assert plan.n_frames == 14
    assert plan.total_tokens == 2016 <= 2048


def test_tiny_policy_for_cpu_training():
    plan = plan_frames(8.0, 128, 96, TINY)
    assert plan.n_frames == 8
    assert (plan.height, plan.width) == (84, 140) and plan.tokens_per_frame == 15
    long = plan_frames(600.0, 128, 96, TINY, video_fps=6.0)
    assert long.n_frames == 16 and long.total_tokens <= 256
    assert long.timestamps[1] - long.timestamps[0] == pytest.approx(37.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_frames": 10, "max_frames": 8},
        {"min_tokens_per_frame": 800, "max_tokens_per_frame": 768},
        {"total_token_budget": 100, "duration_scaling": False},
        {"fps": 0},
        {"fast_ratio": 1.5},
        {"bogus": 1},
    ],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValidationError):
        SamplingPolicy(**kwargs)


def test_plan_rejects_bad_inputs():
    with pytest.raises(ValueError):
        plan_frames(0.0, 320, 240, SamplingPolicy())
    with pytest.raises(ValueError):
        plan_frames(5.0, 0, 240, SamplingPolicy())


def _frames(n: int, h: int = 56, w: int = 84, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.repeat(base[None], n, axis=0)


def test_mark_slowfast_static_and_changes():
    f = _frames(6)
    rng = np.random.default_rng(1)
    f[1] = np.clip(f[1].astype(int) + rng.integers(-3, 4, f[1].shape), 0, 255)  # sensor noise only
    f[3] = 255 - f[3]  # a different picture
    # frame 4 equals frame 0 but differs from frame 3, the last slow frame: slow again
    assert mark_slowfast(f) == [False, True, True, False, False, True]
    f[4] = f[3]
    assert mark_slowfast(f) == [False, True, True, False, True, False]


def test_mark_slowfast_drift_is_measured_against_last_slow_frame():
    f = _frames(12).astype(np.int32)
    for i in range(12):
        f[i] = f[i] + 3 * i  # every frame a little brighter than the previous one
    flags = mark_slowfast(np.clip(f, 0, 255).astype(np.uint8), threshold=0.95, patch_tolerance=8.0)
    assert flags[0] is False
    assert flags[1] is True and flags[2] is True
    assert False in flags[3:]  # drift accumulates until a new slow frame is taken


def test_mark_slowfast_threshold_and_shape_checks():
    f = _frames(2)
    f[1, :28] = 255 - f[1, :28]  # half the patches change
    assert mark_slowfast(f, threshold=0.95) == [False, False]
    assert mark_slowfast(f, threshold=0.4) == [False, True]
    assert mark_slowfast(np.zeros((0, 28, 28, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        mark_slowfast(np.zeros((2, 28, 28), np.uint8))


def test_slowfast_tokens_counts_from_vision_tokens():
    plan = plan_frames(10.0, 1280, 720, SamplingPolicy())
    flags = [False, True, True, False] + [True] * (plan.n_frames - 4)
    sf = slowfast_tokens(plan, flags)
    fh, fw = fast_frame_size(plan.height, plan.width, 0.3)
    assert sf.sizes[1] == (fh, fw) and sf.sizes[0] == (plan.height, plan.width)
    n_fast = sum(flags)
    assert sf.total_tokens == (plan.n_frames - n_fast) * plan.tokens_per_frame + n_fast * frame_tokens(fh, fw)
    assert sf.tokens[1] <= 0.3 * plan.tokens_per_frame + 1
    assert sf.total_tokens < plan.total_tokens
    with pytest.raises(ValueError):
        slowfast_tokens(plan, flags[:-1])
