"""Scene-cut clips on synthetic videos with cuts at known frames."""

from __future__ import annotations

import time

import pytest

from keye.data.scenes import detect_clips, detect_cuts, split_scenes
from keye.datasets.synthetic import ObjectTrack, VideoSpec, encode_video, make_spec


def _spec(
    name: str, fps: int, seconds: float, cuts: list[float], size=(192, 144), codec="libx264", ext="mp4"
):
    return VideoSpec(
        name=name, width=size[0], height=size[1], fps=fps, n_frames=int(round(seconds * fps)), codec=codec,
        ext=ext, options={"preset": "veryfast"} if codec == "libx264" else {"qscale": "5"}, gop=2 * fps,
        rotation=0, seed=11, split="train", cuts=cuts,
        objects=[
            ObjectTrack("triangle", "yellow", 0.5, seconds - 0.5, (0.2, 0.3), (0.8, 0.6), 0.15),
            ObjectTrack("ring", "purple", 2.0, seconds - 1.0, (0.7, 0.7), (0.3, 0.7), 0.12),
        ],
    )  # fmt: skip


@pytest.mark.parametrize(
    "fps,cuts,codec,ext",
    [
        (10, [3.0, 7.5], "libx264", "mp4"),
        (24, [4.25], "libx264", "mkv"),
        (15, [2.0, 4.0, 8.0], "mpeg4", "mp4"),
    ],
)
def test_cuts_found_at_known_frames(tmp_path, fps, cuts, codec, ext):
    spec = _spec(f"cut{fps}", fps, 10.0, cuts, codec=codec, ext=ext)
    path = tmp_path / spec.filename
    encode_video(spec, path)
    sc = detect_cuts(path, analysis_fps=3.0)
    assert len(sc.cuts) == len(cuts), (sc.cuts, cuts)
    for found, true in zip(sc.cuts, cuts, strict=True):
        assert abs(found - true) <= 2.0 / fps  # the exact frame (a skipped non-reference frame at worst)
    assert sc.duration == pytest.approx(10.0, abs=1.0 / fps)
    clips = detect_clips(path, max_clip_s=3.0, min_clip_s=1.0, analysis_fps=3.0)
    starts = [a for a, _ in clips]
    for c in sc.cuts:
        assert any(abs(s - c) < 1e-6 for s in starts)  # every cut starts a clip
    assert all(b - a <= 3.0 + 1e-6 for a, b in clips)


def test_moving_objects_and_background_are_not_cuts(tmp_path):
    spec = _spec("nocut", 15, 8.0, [], size=(256, 192))
    path = tmp_path / spec.filename
    encode_video(spec, path)
    sc = detect_cuts(path)
    assert sc.cuts == []
    assert max(sc.scores) < 22.0  # the default threshold: motion stays well under it
    assert detect_clips(path, max_clip_s=20.0) == [(0.0, pytest.approx(8.0, abs=0.07))]


def test_generated_dataset_cuts_are_detected(tmp_path):
    # the generator's own videos with scene cuts (seed 0 indexes known to have them), exactly as ingest sees them
    found = 0
    for index in range(40):
        spec = make_spec(index, seed=0)
        if not spec.cuts or spec.n_frames * spec.width * spec.height > 12e6:
            continue
        path = tmp_path / spec.filename
        encode_video(spec, path)
        sc = detect_cuts(path)
        assert len(sc.cuts) == len(spec.cuts)
        assert all(abs(a - b) <= 2.0 / spec.fps for a, b in zip(sc.cuts, spec.cuts, strict=True))
        found += 1
        if found == 2:
            break
    assert found == 2


def test_long_low_fps_video_is_fast(tmp_path):
    spec = make_spec(0, seed=0, long=True, duration=180.0)  # 3 min of the long-video kind (128x96, 6 fps)
    path = tmp_path / spec.filename
    encode_video(spec, path)
    t = time.perf_counter()
    sc = detect_cuts(path)
    elapsed = time.perf_counter() - t
    assert len(sc.cuts) == len(spec.cuts) >= 1
    assert all(abs(a - b) <= 2.0 / spec.fps for a, b in zip(sc.cuts, spec.cuts, strict=True))
    assert elapsed < 20.0  # ~1-2 s on an idle core; generous for a shared CI box
    clips = detect_clips(path, max_clip_s=20.0)
    assert all(b - a <= 20.0 + 1e-6 for a, b in clips)
    assert clips[0][0] == 0.0 and clips[-1][1] == pytest.approx(180.0, abs=0.2)


def test_split_scenes_rules():
    clips = split_scenes([4.0, 4.3, 10.0], 25.0, max_clip_s=6.0, min_clip_s=1.0)
    # 4.0-4.3 is too short: merged into the previous scene; 4.3-10 fits; 10-25 (15 s) -> 3 x 5 s
    assert clips == [(0.0, 4.3), (4.3, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 25.0)]
    # clips tile the video with no gap and no overlap
    for (a, b), (c, _) in zip(clips, clips[1:], strict=False):
        assert b == c and a < b
    assert split_scenes([], 5.0, max_clip_s=10.0) == [(0.0, 5.0)]
    assert split_scenes([0.5], 5.0, max_clip_s=10.0, min_clip_s=1.0) == [(0.0, 5.0)]  # short first scene
    assert split_scenes([-1.0, 99.0], 5.0, max_clip_s=2.5) == [(0.0, 2.5), (2.5, 5.0)]
    assert split_scenes([], 0.0, max_clip_s=1.0) == []
    with pytest.raises(ValueError):
        split_scenes([], 5.0, max_clip_s=0.0)
    with pytest.raises(ValueError):
        split_scenes([], 5.0, max_clip_s=1.0, min_clip_s=2.0)
