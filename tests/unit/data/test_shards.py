"""Shards: real H.264 encodes of small generated videos, deterministic atomic tars, verification, webdataset reads."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest

from keye.data.shards import (
    EncodeParams,
    clip_key,
    encode_clip,
    ensure_clip,
    output_size,
    plan_shards,
    probe_clip,
    read_shard,
    sha256_file,
    shard_sha256,
    verify_shard,
    webdataset_keys,
    write_shard,
    write_shards,
)

REPO = Path(__file__).resolve().parents[3]


def make_video(
    path: Path, w: int = 96, h: int = 64, fps: int = 10, seconds: float = 3.0, gop: int = 300
) -> Path:
    """A noisy background with a white bar whose column encodes the frame index (x = 3 * i), long GOP."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.gop_size = gop
        for i in range(int(fps * seconds)):
            img = rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
            img[:, 3 * i : 3 * i + 3] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return path


def bar_column(frame: np.ndarray) -> int:
    return int(np.argmax(frame.mean(axis=(0, 2))))


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("src") / "v.mp4")


def decode_all(path: Path) -> tuple[list[np.ndarray], list[bool], float]:
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        keys = [p.is_keyframe for p in sorted(c.demux(st), key=lambda p: p.pts or 0) if p.size]
        c.seek(0)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return frames, keys, float(st.average_rate)


def test_output_size_caps_and_keeps_even() -> None:
    assert output_size(1920, 1080, 448) == (448, 252)
    assert output_size(97, 63, 448) == (96, 64)
    w, h = output_size(1080, 1920, 224)
    assert h == 224 and w % 2 == 0 and w == 126


def test_encode_clip_cuts_scales_and_short_gop(video: Path, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    info = encode_clip(video, 1.0, 2.5, out, max_side=48, gop=0.5)
    assert (info.width, info.height, info.n_frames, info.fps) == (48, 32, 15, 10.0)
    assert info.duration == pytest.approx(1.5) and info.bytes == out.stat().st_size
    assert probe_clip(out) == info
    frames, keyframes, fps = decode_all(out)
    assert len(frames) == 15 and fps == 10.0
    assert [i for i, k in enumerate(keyframes) if k] == [0, 5, 10]  # GOP 0.5 s at 10 fps
    # first/last frames are source frames 10 and 24 (bar at x = 30 / 72 in 96 px -> 15 / 36 in 48 px)
    assert abs(bar_column(frames[0]) - 15) <= 1 and abs(bar_column(frames[-1]) - 36) <= 1
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.video[0].format.name == "yuv420p"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_encode_clip_lower_fps_and_adjacent_clips_partition_frames(video: Path, tmp_path: Path) -> None:
    info = encode_clip(video, 1.0, 2.5, tmp_path / "a.mp4", max_side=96, fps=4)
    assert info.n_frames == 6 and info.fps == 4.0
    frames, _, _ = decode_all(tmp_path / "a.mp4")
    assert [round(bar_column(f) / 3) for f in frames] == pytest.approx([10, 12, 15, 18, 20, 22], abs=1)
    a = encode_clip(video, 0.0, 1.3, tmp_path / "b.mp4", max_side=96)
    b = encode_clip(video, 1.3, 3.0, tmp_path / "c.mp4", max_side=96)
    assert a.n_frames + b.n_frames == 30


def test_encode_clip_rejects_empty_ranges(video: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        encode_clip(video, 2.0, 2.0, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="no frame"):
        encode_clip(video, 5.0, 6.0, tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())  # nothing half-written, not even a temp


def test_encode_is_deterministic_and_cache_skips(video: Path, tmp_path: Path) -> None:
    p = EncodeParams(max_side=64, gop_seconds=1.0)
    path, info, cached = ensure_clip(tmp_path, "cabc", video, 0.5, 2.0, p)
    assert not cached and path.parent.name == p.digest()
    mtime = path.stat().st_mtime_ns
    path2, info2, cached2 = ensure_clip(tmp_path, "cabc", video, 0.5, 2.0, p)
    assert cached2 and path2 == path and info2 == info and path.stat().st_mtime_ns == mtime
    other = encode_clip(video, 0.5, 2.0, tmp_path / "again.mp4", max_side=64, gop=1.0)
    assert other == info and sha256_file(tmp_path / "again.mp4") == sha256_file(path)
    assert EncodeParams(max_side=32).digest() != p.digest()


def test_plan_shards_is_sorted_size_targeted_and_validates() -> None:
    items = [("c3", 40), ("c1", 50), ("c2", 60), ("c5", 200), ("c4", 10)]
    plan = plan_shards(items, target_bytes=100)
    assert plan == [["c1"], ["c2", "c3"], ["c4"], ["c5"]]
    assert plan_shards(list(reversed(items)), 100) == plan
    assert plan_shards(items, 10_000) == [["c1", "c2", "c3", "c4", "c5"]]
    for bad in (["a.b"], ["a/b"], [""], ["k", "k"]):
        with pytest.raises(ValueError):
            plan_shards([(k, 1) for k in bad], 100)
    assert clip_key("v1:0.0-8.0").startswith("c") and len(clip_key("x")) == 17 and "." not in clip_key("x")


@pytest.fixture()
def samples(video: Path, tmp_path: Path) -> list[tuple[str, Path, dict]]:
    out = []
    for i, (s, e) in enumerate([(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]):
        key = clip_key(f"v:{i}")
        mp4 = tmp_path / "clips" / f"{key}.mp4"
        info = encode_clip(video, s, e, mp4, max_side=48)
        out.append(
            (
                key,
                mp4,
                {"key": key, "clip_start": s, "clip_end": e, "caption": f"clip {i} é", "n": info.n_frames},
            )
        )
    return out


def test_write_shard_is_deterministic_verifiable_and_webdataset_readable(samples, tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a", "train-000000", samples)
    b = write_shard(tmp_path / "b", "train-000000", list(reversed(samples)))
    assert a.path.name == "train-000000.tar" and a.n_samples == 3 and a.bytes == a.path.stat().st_size
    assert a.sha256 == b.sha256 == sha256_file(a.path) == shard_sha256(samples)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.keys == sorted(k for k, _, _ in samples)
    assert verify_shard(a.path, a.sha256, expected_keys=a.keys, with_webdataset=True) == []
    with tarfile.open(a.path) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    assert [m.name for m in members][:2] == [f"{a.keys[0]}.mp4", f"{a.keys[0]}.json"]
    got = list(read_shard(a.path))
    by_key = {k: (p, j) for k, p, j in samples}
    for key, mp4, meta in got:
        assert mp4 == by_key[key][0].read_bytes() and meta == by_key[key][1]
    # the webdataset library itself yields the intended samples with the intended content
    import webdataset as wds

    ds = list(wds.WebDataset(str(a.path), shardshuffle=False))
    assert [s["__key__"] for s in ds] == a.keys == webdataset_keys(a.path)
    assert (
        json.loads(ds[0]["json"]) == by_key[a.keys[0]][1]
        and ds[0]["mp4"] == by_key[a.keys[0]][0].read_bytes()
    )
    with av.open(io.BytesIO(ds[1]["mp4"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == by_key[a.keys[1]][1]["n"]


def test_write_shard_rejects_bad_keys(samples, tmp_path: Path) -> None:
    _, mp4, meta = samples[0]
    for bad in ([("a.b", mp4, meta)], [("a/b", mp4, meta)], [("k", mp4, meta), ("k", mp4, meta)]):
        with pytest.raises(ValueError):
            write_shard(tmp_path, "s", bad)
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*"))


def test_verify_detects_flipped_byte_missing_file_and_broken_pairs(samples, tmp_path: Path) -> None:
    info = write_shard(tmp_path, "s-000000", samples)
    data = bytearray(info.path.read_bytes())
    data[1200] ^= 0xFF  # inside the first mp4 payload (after the 512-byte header)
    bad = tmp_path / "flipped.tar"
    bad.write_bytes(bytes(data))
    problems = verify_shard(bad, info.sha256)
    assert len(problems) == 1 and "sha256" in problems[0]
    tail = tmp_path / "tail.tar"  # bytes after the end-of-archive blocks are hashed too
    tail.write_bytes(info.path.read_bytes() + b"\0" * 512)
    assert verify_shard(tail) == [] and "sha256" in verify_shard(tail, info.sha256)[0]
    header_flip = bytearray(info.path.read_bytes())
    header_flip[100] ^= 0xFF  # inside the mode field of the first header: checksum fails
    (tmp_path / "hdr.tar").write_bytes(bytes(header_flip))
    assert any("unreadable" in p or "no samples" in p for p in verify_shard(tmp_path / "hdr.tar", None))
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(info.path.read_bytes()[:3000])
    assert any("unreadable" in p for p in verify_shard(trunc))
    assert verify_shard(tmp_path / "nope.tar", info.sha256) == [f"{tmp_path / 'nope.tar'}: missing"]
    lonely = tmp_path / "lonely.tar"
    with tarfile.open(lonely, "w") as tar:
        blob = samples[0][1].read_bytes()
        ti = tarfile.TarInfo("c0.mp4")
        ti.size = len(blob)
        tar.addfile(ti, io.BytesIO(blob))
        ti = tarfile.TarInfo("c1.json")
        ti.size = 2
        tar.addfile(ti, io.BytesIO(b"{]"))
    probs = verify_shard(lonely)
    assert any("'c0' lacks json" in p for p in probs) and any("'c1' lacks mp4" in p for p in probs)
    assert any("json unreadable" in p for p in probs)
    with pytest.raises(ValueError, match="expected exactly mp4 and json"):
        list(read_shard(lonely))
    assert verify_shard(info.path, info.sha256, expected_keys=info.keys[:2]) != []


def test_write_shards_resumes_and_rewrites_wrong_content(samples, tmp_path: Path) -> None:
    sizes = {k: p.stat().st_size for k, p, _ in samples}
    target = sorted(sizes.values())[-1] + 1  # forces more than one shard
    out = tmp_path / "shards"
    first = write_shards(out, "train", samples, sizes, target)
    assert len(first) >= 2 and not any(s.skipped for s in first)
    assert sorted(k for s in first for k in s.keys) == sorted(sizes)
    again = write_shards(out, "train", samples, sizes, target)
    assert all(s.skipped for s in again) and [s.sha256 for s in again] == [s.sha256 for s in first]
    first[0].path.write_bytes(b"garbage")
    third = write_shards(out, "train", samples, sizes, target)
    assert not third[0].skipped and third[0].sha256 == first[0].sha256 and all(s.skipped for s in third[1:])


KILL_SCRIPT = textwrap.dedent(
    """
    import json, sys, tarfile, time
    from keye.data.shards import write_shard
    orig = tarfile.TarFile.addfile
    calls = 0
    def slow_addfile(self, *a, **k):
        global calls
        orig(self, *a, **k)
        calls += 1
        if calls == 3:  # first sample and half of the second are on disk
            print("MIDWAY", flush=True)
            time.sleep(120)
    tarfile.TarFile.addfile = slow_addfile
    samples = [tuple(s) for s in json.loads(sys.argv[2])]
    write_shard(sys.argv[1], "train-000000", samples)
    """
)


def test_sigkill_mid_shard_leaves_nothing_final_and_rerun_matches(samples, tmp_path: Path) -> None:
    big = tmp_path / "big.mp4"  # a 2 MB member (sorted first) so the killed writer has really flushed bytes
    big.write_bytes(np.random.default_rng(1).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes())
    samples = [("a-big", big, {"key": "a-big"}), *samples]
    ref = write_shard(tmp_path / "ref", "train-000000", samples)
    out = tmp_path / "out"
    arg = json.dumps([[k, str(p), j] for k, p, j in samples])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(out), arg], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "MIDWAY"
        temps = list(out.glob(".train-000000.tar.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # a partial tar really is on disk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train-000000.tar").exists()
    assert verify_shard(out / "train-000000.tar", ref.sha256) != []
    from keye.core.atomic import remove_stale_temps

    assert len(remove_stale_temps(out)) == 1
    sizes = {k: p.stat().st_size for k, p, _ in samples}
    rerun = write_shards(out, "train", samples, sizes, target_bytes=1 << 30)
    assert len(rerun) == 1 and not rerun[0].skipped and rerun[0].sha256 == ref.sha256
    assert verify_shard(rerun[0].path, ref.sha256, with_webdataset=True) == []
    assert [p.name for p in out.iterdir()] == ["train-000000.tar"]


def test_encode_clip_applies_rotation_like_decode_frames(tmp_path: Path) -> None:
    src = tmp_path / "rot.mp4"
    with av.open(str(src), "w") as c:
        st = c.add_stream("libx264", rate=10)
        st.width, st.height, st.pix_fmt = 96, 64, "yuv420p"
        st.set_display_rotation(90)  # a phone video shot in portrait
        for i in range(10):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:8, :8] = 255  # white block in the coded top-left corner
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    info = encode_clip(src, 0.0, 1.0, tmp_path / "out.mp4", max_side=96)
    assert (info.width, info.height) == (64, 96)
    frames, _, _ = decode_all(tmp_path / "out.mp4")
    white = np.argwhere(frames[0].mean(-1) > 128).mean(0)
    assert white[0] > 80 and white[1] < 10  # displayed upright: the block is now bottom-left
    from keye.data.video import decode_frames

    ref = decode_frames(src, [0.0])[0]
    assert ref.shape == frames[0].shape and np.abs(ref.astype(int) - frames[0].astype(int)).mean() < 8
