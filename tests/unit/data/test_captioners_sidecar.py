"""Sidecar captioner: annotation JSON / SRT / VTT / TXT next to real (tiny) videos, restricted to clips."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from keye.data.captioners import CaptionRecord, ClipRef, build_captioner
from keye.data.captioners.sidecar import compose_caption, parse_subtitles


def make_video(path: Path, seconds: float = 8.0, fps: int = 4, w: int = 64, h: int = 48) -> Path:
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (i * 7) % 255, np.uint8), format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return path


ANN = {
    "schema": "keye.annotations/v1",
    "video": "evt.mp4",
    "duration": 8.0,
    "split": "heldout",
    "caption": "A red circle appears at the top left, then a blue square turns green.",
    "dense_captions": [
        {"start": 0.5, "end": 2.0, "text": "a red circle appears at the top left"},
        {"start": 3.0, "end": 4.5, "text": "the blue square turns green"},
        {"start": 3.5, "end": 7.5, "text": "the circle moves right"},
        {"start": 1.0, "end": "bad", "text": "malformed"},
    ],
    "grounding": [{"query": "the blue square turns green", "start": 3.0, "end": 4.5}],
    "mcq": [
        {
            "question": "What colour was the circle?",
            "options": ["red", "blue", "green", "yellow"],
            "answer": 0,
            "start": 0.5,
            "end": 2.0,
            "kind": "color",
        },
        {
            "question": "What happened first?",
            "options": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "answer": 5,
            "start": 0.0,
            "end": 8.0,
            "kind": "order",
        },
    ],
    "subtitles": [{"start": 1.8, "end": 3.2, "text": "look at that"}],
}


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vids")
    make_video(d / "evt.mp4")
    (d / "evt.json").write_text(json.dumps(ANN))
    return d


def clip(d: Path, name: str, start: float, end: float, cid: str | None = None) -> ClipRef:
    return ClipRef(cid or f"{name}:{start}-{end}", str(d / name), start, end, 4.0, 64, 48, video_id=name)


def test_json_whole_video_gets_video_caption_and_everything(vids: Path) -> None:
    cap = build_captioner({"backend": "sidecar"})
    (rec,) = cap.caption([clip(vids, "evt.mp4", 0.0, 8.0)])
    assert rec.ok and rec.caption == ANN["caption"]
    assert (rec.backend, rec.model, rec.prompt_version) == ("sidecar", "sidecar", "v1")
    assert len(rec.dense_captions) == 3 and len(rec.mcq) == 2 and len(rec.grounding) == 1
    assert rec.meta["split"] == "heldout" and rec.meta["skipped_malformed_items"] == 1
    d = rec.to_dict()
    assert set(d) >= {
        "clip_id",
        "backend",
        "model",
        "prompt_version",
        "caption",
        "dense_captions",
        "grounding",
        "mcq",
        "subtitles",
    }
    json.dumps(d)


def test_partial_clip_restricts_shifts_and_composes(vids: Path) -> None:
    cap = build_captioner({"backend": "sidecar"})
    a, b = cap.caption([clip(vids, "evt.mp4", 0.0, 2.5), clip(vids, "evt.mp4", 2.5, 5.0)])
    assert a.ok and a.caption == "A red circle appears at the top left."
    assert a.dense_captions == [{"start": 0.5, "end": 2.0, "text": "a red circle appears at the top left"}]
    assert [q["question"] for q in a.mcq] == ["What colour was the circle?"]
    assert (a.mcq[0]["start"], a.mcq[0]["end"], a.mcq[0]["answer"]) == (0.5, 2.0, 0)
    assert a.grounding == [] and a.subtitles == [{"start": 1.8, "end": 2.5, "text": "look at that"}]
    # second clip: times shifted to clip time; the 3.5-7.5 caption sticks out and is dropped
    assert b.caption == "The blue square turns green."
    assert b.dense_captions == [{"start": 0.5, "end": 2.0, "text": "the blue square turns green"}]
    assert b.grounding == [{"query": "the blue square turns green", "start": 0.5, "end": 2.0}]
    assert b.mcq == [] and b.subtitles == [{"start": 0.0, "end": 0.7, "text": "look at that"}]
    assert b.meta["caption_from"] == "composed from dense captions"


def test_clip_without_usable_annotation_gets_error_record(vids: Path, tmp_path: Path) -> None:
    cap = build_captioner({"backend": "sidecar"})
    (rec,) = cap.caption([clip(vids, "evt.mp4", 5.0, 7.0)])  # nothing lies fully inside, 25% of the video
    assert not rec.ok and rec.caption == "" and "lies inside clip" in rec.error and "25%" in rec.error
    make_video(tmp_path / "bare.mp4", seconds=1)
    (none,) = cap.caption([clip(tmp_path, "bare.mp4", 0.0, 1.0)])
    assert not none.ok and "no annotation file for bare.mp4" in none.error and "bare.srt" in none.error
    (tmp_path / "bad.json").write_text('{"schema": "other/v2", "caption": "x"}')
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "bad.mp4").write_bytes(b"")
    (tmp_path / "broken.mp4").write_bytes(b"")
    r1, r2 = cap.caption([clip(tmp_path, "bad.mp4", 0, 1), clip(tmp_path, "broken.mp4", 0, 1)])
    assert "schema 'other/v2'" in r1.error and "not valid JSON" in r2.error


SRT = """1
00:00:00,500 --> 00:00:02,000
<i>A dog runs</i> &amp; barks

2
00:00:03,000 --> 00:00:04,250
The dog
sits down
"""

VTT = """WEBVTT

NOTE this is a comment --> not a cue

intro
00:00.500 --> 00:02.000 align:start
<v Ann>a dog runs</v>

00:00:03.000 --> 00:00:04.250
the dog sits down
"""


def test_subtitle_parsers() -> None:
    srt = parse_subtitles(SRT)
    assert srt == [
        {"start": 0.5, "end": 2.0, "text": "A dog runs & barks"},
        {"start": 3.0, "end": 4.25, "text": "The dog sits down"},
    ]
    vtt = parse_subtitles("\ufeff" + VTT.replace("\n", "\r\n"))
    assert vtt == [
        {"start": 0.5, "end": 2.0, "text": "a dog runs"},
        {"start": 3.0, "end": 4.25, "text": "the dog sits down"},
    ]
    assert parse_subtitles("WEBVTT\n\nno cues here\n") == []


def test_srt_vtt_txt_and_annotations_dir(tmp_path: Path) -> None:
    vids, ann = tmp_path / "v", tmp_path / "ann"
    vids.mkdir()
    ann.mkdir()
    for name in ("s", "t", "x"):
        make_video(vids / f"{name}.mp4", seconds=5)
    (vids / "s.srt").write_text(SRT)
    (ann / "t.vtt").write_text(VTT)
    (vids / "x.txt").write_text("  A whole-video\ncaption. ")
    cap = build_captioner({"backend": "sidecar", "annotations_dir": str(ann), "prompt_version": "rules-v1"})
    recs = cap.caption(
        [
            clip(vids, "s.mp4", 0, 5),
            clip(vids, "t.mp4", 2.5, 5),
            clip(vids, "x.mp4", 0, 5),
            clip(vids, "x.mp4", 0, 2),
        ]
    )
    s, t, x, x_part = recs
    assert s.caption == "A dog runs & barks. Then the dog sits down." and len(s.dense_captions) == 2
    assert t.caption == "The dog sits down." and t.dense_captions[0]["start"] == 0.5
    assert t.meta["source"].endswith("ann/t.vtt") and t.prompt_version == "rules-v1"
    assert x.caption == "A whole-video caption." and x.meta["caption_from"] == "video caption"
    assert not x_part.ok and "40% of the video" in x_part.error


def test_compose_caption_orders_and_dedupes() -> None:
    dense = [
        {"start": 2, "end": 3, "text": "B moves."},
        {"start": 0, "end": 1, "text": "a appears"},
        {"start": 2, "end": 3, "text": "b moves"},
    ]
    assert compose_caption(dense) == "A appears. Then b moves."


def test_build_captioner_rejects_bad_configs() -> None:
    with pytest.raises(ValueError, match="backend"):
        build_captioner({})
    with pytest.raises(ValueError, match="unknown captioner backend 'nope'"):
        build_captioner({"backend": "nope"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        build_captioner({"backend": "sidecar", "colour": 1})
    with pytest.raises(ValueError, match=r"missing required option\(s\) \['base_url', 'model'\]"):
        build_captioner({"backend": "openai"})
    assert isinstance(CaptionRecord("c", "b", "m", "v").caption_id, str)
    assert CaptionRecord("c", "b", "m", "v").caption_id != CaptionRecord("c", "b", "m", "v2").caption_id
