"""From the synthetic generator's videos (every codec/container it makes, a rotated one too) through the sidecar
captioner, clip encoding and shards to a webdataset read-back: the library path of the caption + shard stages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import pytest

from keye.data.captioners import ClipRef, build_captioner
from keye.data.shards import EncodeParams, clip_key, ensure_clip, read_shard, verify_shard, write_shards
from keye.data.video import probe
from keye.datasets.synthetic import annotations, encode_video, make_spec

# make_spec(i, seed=0) of index i: (codec, container, rotation) -> short video index, found by scanning make_spec
SPECS = {"h264-mp4": 2, "h264-mkv": 35, "mpeg4-mp4": 51, "vp9-webm": 24, "h264-mp4-rot90": 18}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("syn")
    out = {}
    for label, i in SPECS.items():
        spec = make_spec(i, 0)
        path = d / spec.filename
        encode_video(spec, path)
        (d / f"{spec.name}.json").write_text(json.dumps(annotations(spec)))
        out[label] = path
    return out


def test_synthetic_videos_to_verified_shards(videos: dict[str, Path], tmp_path: Path) -> None:
    assert (
        make_spec(SPECS["h264-mp4-rot90"], 0).rotation == 90 and make_spec(SPECS["vp9-webm"], 0).ext == "webm"
    )
    clips, probes = [], {}
    for label, v in videos.items():
        p = probes[label] = probe(v)
        for s, e in [(0.0, p.duration), (0.0, p.duration / 2), (p.duration / 2, p.duration)]:
            clips.append(ClipRef(f"{v.stem}:{s:.3f}-{e:.3f}", str(v), s, e, p.fps, p.width, p.height, v.stem))
    recs = build_captioner({"backend": "sidecar"}).caption(clips)
    whole = recs[::3]
    assert all(r.ok and r.meta["caption_from"] == "video caption" for r in whole)
    for c, r in zip(clips, recs, strict=True):  # every kept item lies inside its clip, in clip time
        for item in r.dense_captions + r.grounding + r.mcq:
            assert 0.0 <= item["start"] <= item["end"] <= c.duration + 1e-6
    params = EncodeParams(max_side=128, gop_seconds=0.5)
    samples, sizes = [], {}
    for c, r in zip(clips, recs, strict=True):
        if not r.ok:
            continue
        key = clip_key(c.clip_id)
        path, info, _ = ensure_clip(tmp_path / "cache", key, c.video_path, c.start, c.end, params)
        # the encoded clip keeps the displayed orientation and (almost) every frame of the interval
        assert max(info.width, info.height) <= 128 and (info.width > info.height) == (c.width > c.height)
        assert abs(info.n_frames - c.duration * c.fps) <= 1.01
        samples.append((key, path, {"key": key, "clip_id": c.clip_id, **r.to_dict()}))
        sizes[key] = info.bytes
    assert len(samples) >= len(whole) + 2
    shards = write_shards(tmp_path / "shards", "train", samples, sizes, target_bytes=sum(sizes.values()) // 3)
    assert len(shards) >= 2 and sum(s.n_samples for s in shards) == len(samples)
    seen = []
    for s in shards:
        assert verify_shard(s.path, s.sha256, expected_keys=s.keys, with_webdataset=True) == []
        for key, mp4, meta in read_shard(s.path):
            seen.append(key)
            with av.open(io.BytesIO(mp4)) as c:
                st = c.streams.video[0]
                assert st.codec_context.name == "h264" and st.frames >= 1
            assert meta["key"] == key and meta["caption"]
    assert sorted(seen) == sorted(k for k, _, _ in samples)
    again = write_shards(tmp_path / "shards", "train", samples, sizes, target_bytes=sum(sizes.values()) // 3)
    assert all(s.skipped for s in again) and [s.sha256 for s in again] == [s.sha256 for s in shards]
