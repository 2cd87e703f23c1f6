"""Probe, rejection reasons and sampled decoding on real small videos made in tmp_path."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import av
import numpy as np
import pytest
from fixtures.corrupt_videos import corrupt_examples

from keye.core.hashing import sha256_file
from keye.data.video import DecodeStats, VideoRejected, decode_frames, probe
from keye.datasets.synthetic import (
    ObjectTrack,
    VideoSpec,
    encode_video,
    expected_frames,
)

CASES = {
    # name: (codec, ext, options, gop, rotation, fps, seconds, size)
    "h264_mp4": ("libx264", "mp4", {"preset": "veryfast"}, 12, 0, 12, 4.0, (160, 120)),
    "h264_longgop": (
        "libx264",
        "mp4",
        {"preset": "ultrafast", "sc_threshold": "0"},
        250,
        0,
        25,
        12.0,
        (128, 96),
    ),
    "h264_shortgop": ("libx264", "mp4", {"preset": "ultrafast"}, 5, 0, 25, 12.0, (128, 96)),
    "h264_mkv": ("libx264", "mkv", {"preset": "veryfast"}, 30, 0, 15, 4.0, (192, 144)),
    "mpeg4_mp4": ("mpeg4", "mp4", {"qscale": "5"}, 10, 0, 10, 3.0, (160, 120)),
    "vp9_webm": (
        "libvpx-vp9",
        "webm",
        {"deadline": "realtime", "cpu-used": "8", "crf": "40", "b": "0"},
        20,
        0,
        10,
        3.0,
        (160, 120),
    ),
    "h264_ts_noindex": ("libx264", "ts", {"preset": "veryfast"}, 25, 0, 25, 6.0, (160, 120)),
    "h264_rot90": ("libx264", "mp4", {"preset": "veryfast"}, 12, 90, 12, 3.0, (160, 96)),
}


def _spec(name: str) -> VideoSpec:
    codec, ext, opts, gop, rot, fps, secs, (w, h) = CASES[name]
    n = int(secs * fps)
    return VideoSpec(
        name=name, width=w, height=h, fps=fps, n_frames=n, codec=codec, ext=ext, options=dict(opts), gop=gop,
        rotation=rot, seed=3, split="train", cuts=[],
        objects=[
            ObjectTrack("square", "red", 0.0, secs, (0.25, 0.3), (0.75, 0.3), 0.18),
            ObjectTrack("circle", "blue", secs / 3, secs, (0.3, 0.75), (0.7, 0.7), 0.15),
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {}
    for name in CASES:
        spec = _spec(name)
        path = d / spec.filename
        encode_video(spec, path)
        out[name] = path
    return out


def naive(path: Path | io.BytesIO, timestamps: list[float]) -> np.ndarray:
    """Reference: decode every frame, take the one nearest each timestamp (ties -> earlier)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        t0 = s.start_time or 0
        frames = [(float((f.pts - t0) * s.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(s)]
    return np.stack([min(frames, key=lambda x: (abs(x[0] - t), x[0]))[1] for t in timestamps])


@pytest.mark.parametrize("name", list(CASES))
def test_probe_fields(videos, name):
    codec, ext, _, _, rot, fps, secs, (w, h) = CASES[name]
    p = probe(videos[name])
    assert p.codec == {"libx264": "h264", "mpeg4": "mpeg4", "libvpx-vp9": "vp9"}[codec]
    assert {"mp4": "mp4", "mkv": "matroska", "webm": "matroska", "ts": "mpegts"}[ext] in p.container
    assert p.fps == pytest.approx(fps)
    assert p.duration == pytest.approx(secs, abs=1.5 / fps)
    assert (p.width, p.height) == (w, h)  # displayed size, also for the rotated one
    assert p.rotation == rot
    assert p.n_frames == pytest.approx(int(secs * fps), abs=1)
    assert (p.n_video_streams, p.n_audio_streams) == (1, 0)
    assert p.size_bytes == videos[name].stat().st_size
    assert p.bit_rate and p.bit_rate > 0


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return corrupt_examples(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "kind,words",
    [
        ("zero_bytes", "empty file"),
        ("truncated", "truncated"),
        ("truncated_faststart", "truncated"),
        ("not_video", "not a video"),
        ("audio_only", "no video stream"),
        ("too_short", "too short"),
        ("undecodable", "corrupt"),
    ],
)
def test_probe_rejects_with_reason(bad, kind, words):
    with pytest.raises(VideoRejected) as e:
        probe(bad[kind])
    assert words in e.value.reason
    assert e.value.reason == str(e.value)


def test_probe_missing_and_min_duration(tmp_path, videos):
    with pytest.raises(VideoRejected, match="does not exist"):
        probe(tmp_path / "nope.mp4")
    with pytest.raises(VideoRejected, match="too short"):
        probe(videos["mpeg4_mp4"], min_duration=5.0)


def test_decode_rejects_bad_inputs(bad):
    with pytest.raises(VideoRejected):
        decode_frames(bad["not_video"], [0.0])
    with pytest.raises(VideoRejected, match="no video stream"):
        decode_frames(bad["audio_only"], [0.0])
    with pytest.raises(VideoRejected):
        decode_frames(bad["undecodable"], list(np.arange(0, 6, 0.1)))


@pytest.mark.parametrize("name", [n for n in CASES if n != "h264_rot90"])
def test_decode_equals_decode_everything(videos, name):
    path = videos[name]
    dur = probe(path).duration
    rng = np.random.default_rng(0)
    ts = [0.0, *sorted(rng.uniform(0, dur, 7).tolist()), dur * 0.5, dur * 0.5, 0.01, dur + 3.0]
    got = decode_frames(path, ts)
    assert got.dtype == np.uint8 and got.shape[0] == len(ts) and got.shape[-1] == 3
    np.testing.assert_array_equal(got, naive(path, ts))


def test_decode_file_like_and_resize(videos):
    path = videos["h264_mkv"]
    ts = [0.5, 1.0, 3.5]
    from_bytes = decode_frames(io.BytesIO(path.read_bytes()), ts)
    np.testing.assert_array_equal(from_bytes, decode_frames(path, ts))
    small = decode_frames(path, ts, size=(56, 84))
    assert small.shape == (3, 56, 84, 3)
    # the resized frame is the same picture: per-quadrant mean colours agree with the full-size frame
    full = from_bytes.astype(np.float32)
    for img_s, img_f in zip(small.astype(np.float32), full, strict=True):
        for qs, qf in zip(_quadrants(img_s), _quadrants(img_f), strict=True):
            assert np.abs(qs.mean((0, 1)) - qf.mean((0, 1))).max() < 10


def _quadrants(img: np.ndarray) -> list[np.ndarray]:
    h, w = img.shape[0] // 2, img.shape[1] // 2
    return [img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:]]


def test_decode_respects_rotation(videos):
    spec = _spec("h264_rot90")
    path = videos["h264_rot90"]
    ks = [0, spec.n_frames // 2, spec.n_frames - 1]
    expected = expected_frames(spec, ks).astype(np.int32)
    got = decode_frames(path, [k / spec.fps for k in ks])
    assert got.shape == (3, spec.height, spec.width, 3)  # displayed (upright) orientation
    assert np.abs(got - expected).mean() < 12
    with av.open(str(path)) as c:  # the stored picture is sideways: without rotation it would not match
        raw = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert raw.shape[:2] == (spec.width, spec.height)
    sized = decode_frames(path, [0.0], size=(48, 80))
    assert sized.shape == (1, 48, 80, 3)


def test_decode_only_what_targets_need(videos):
    long_gop, short_gop = videos["h264_longgop"], videos["h264_shortgop"]
    total = probe(long_gop).n_frames
    sparse = [1.0, 5.0, 9.0]  # all inside the first GOP (250 frames = 10 s): one seek, decode forward
    st = DecodeStats()
    decode_frames(long_gop, sparse, stats=st)
    assert st.seeks == 1 and st.converted == 3
    assert st.decoded <= int(9.0 * 25) + 3
    st = DecodeStats()  # the keyframe at 10 s lies between 9 s and 11 s: seek there instead of decoding on
    decode_frames(long_gop, [9.0, 11.0], stats=st)
    assert st.seeks == 2
    st = DecodeStats()  # keyframe every 5 frames: seek next to each target, decode a handful
    decode_frames(short_gop, sparse, stats=st)
    assert st.seeks == 3 and st.decoded <= 3 * 6 < total
    dense = [i * 0.5 for i in range(24)]  # 2 fps on 25 fps, GOP 5: decode forward where cheaper
    st = DecodeStats()
    out = decode_frames(short_gop, dense, stats=st)
    assert st.converted == 24 and st.decoded < total
    np.testing.assert_array_equal(out, naive(short_gop, dense))


def test_non_reference_frames_are_skipped_not_decoded(videos):
    """veryfast x264 has B-frames nothing refers to: the ones between targets never reach the decoder."""
    path = videos["h264_mp4"]
    ts = [i * 0.5 for i in range(8)]
    st = DecodeStats()
    out = decode_frames(path, ts, stats=st)
    assert st.skipped > 0
    assert st.decoded + st.skipped <= probe(path).n_frames
    np.testing.assert_array_equal(out, naive(path, ts))


def test_decode_empty_and_duplicate_requests(videos):
    path = videos["h264_mp4"]
    assert decode_frames(path, []).shape == (0, 120, 160, 3)
    st = DecodeStats()
    out = decode_frames(path, [1.0, 1.0, 1.01], stats=st)
    assert st.converted == 1
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    with pytest.raises(ValueError):
        decode_frames(path, [float("nan")])


def test_sha256_file_streams(tmp_path):
    p = tmp_path / "x.bin"
    data = np.random.default_rng(0).integers(0, 256, 3_000_001, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    assert sha256_file(p, chunk_size=1 << 16) == hashlib.sha256(data).hexdigest()
