"""The synthetic event-video dataset: determinism, the sidecar format, and annotations that match the pixels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pytest

from keye.data.video import decode_frames, probe
from keye.datasets.synthetic import (
    COLORS,
    SCHEMA,
    SHAPES,
    annotations,
    dataset_specs,
    generate_dataset,
    make_spec,
)
from keye.datasets.synthetic.__main__ import main


def _small(n: int) -> dict:
    # short, small videos keep the test fast; the spread of kinds comes from the real specs
    return {"n_videos": n, "n_long": 1, "long_duration": 20.0, "workers": 1}


def _frames_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            h.update(f.to_ndarray(format="rgb24").tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("syn")
    return d, generate_dataset(d, seed=3, **_small(5))


def test_deterministic_by_seed(small_set, tmp_path):
    d, paths = small_set
    again = generate_dataset(tmp_path, seed=3, **_small(5))
    assert [p.name for p in paths] == [p.name for p in again]
    for a, b in zip(paths, again, strict=True):
        ja, jb = a.with_suffix(".json"), b.with_suffix(".json")
        assert ja.read_bytes() == jb.read_bytes()  # byte-identical annotations
        assert _frames_digest(a) == _frames_digest(b)  # decodably identical videos
    other = [annotations(s) for s in dataset_specs(5, 0, seed=4)]
    assert [annotations(s) for s in dataset_specs(5, 0, seed=3)] != other


def test_rerun_keeps_existing_videos(small_set):
    d, paths = small_set
    mtimes = [p.stat().st_mtime_ns for p in paths]
    generate_dataset(d, seed=3, **_small(5))
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert not list(d.glob(".*tmp*"))  # no temporary leftovers


def _check_doc(doc: dict, video: Path) -> None:
    assert doc["schema"] == SCHEMA and doc["video"] == video.name
    assert doc["split"] in ("train", "heldout")
    dur = doc["duration"]
    pr = probe(video)
    assert pr.duration == pytest.approx(dur, abs=0.11)
    assert isinstance(doc["caption"], str) and len(doc["caption"]) > 10
    assert doc["dense_captions"] and doc["grounding"] and doc["mcq"]
    for item in doc["dense_captions"] + doc["grounding"]:
        assert 0.0 <= item["start"] <= item["end"] <= dur + 1e-6
        assert set(item) in ({"start", "end", "text"}, {"start", "end", "query"})
    queries = [g["query"] for g in doc["grounding"]]
    assert len(queries) == len(set(queries))  # each query names one thing
    for q in doc["mcq"]:
        assert set(q) == {"question", "options", "answer", "start", "end", "kind"}
        assert len(q["options"]) in (4, 8) and len(set(q["options"])) == len(q["options"])
        assert 0 <= q["answer"] < len(q["options"])
        assert 0.0 <= q["start"] <= q["end"] <= dur + 1e-6
        assert q["kind"] in (
            "color",
            "position",
            "motion",
            "change",
            "order",
            "count",
            "color_presence",
            "shape_presence",
        )


def test_sidecar_format(small_set):
    d, paths = small_set
    kinds: set[str] = set()
    sizes: set[int] = set()
    for p in paths:
        doc = json.loads(p.with_suffix(".json").read_text())
        _check_doc(doc, p)
        kinds |= {q["kind"] for q in doc["mcq"]}
        sizes |= {len(q["options"]) for q in doc["mcq"]}
    assert sizes == {4, 8}
    assert {"color", "order", "count"} <= kinds


def test_spread_and_heldout_split():
    specs = dataset_specs(40, 1, seed=0)
    short = specs[:40]
    held = [s for s in short if s.split == "heldout"]
    assert 0.15 <= len(held) / 40 <= 0.2
    assert len({(s.width, s.height) for s in short}) >= 5
    assert len({s.fps for s in short}) >= 4
    assert {s.codec for s in short} >= {"libx264", "mpeg4", "libvpx-vp9"}
    assert {s.ext for s in short} >= {"mp4", "mkv", "webm"}
    assert any(s.cuts for s in short) and any(not s.cuts for s in short)
    assert any(s.rotation for s in short)
    assert all(3.0 <= s.duration <= 20.5 for s in short)
    long = specs[40]
    assert long.duration >= 600 and (long.width, long.height) == (128, 96) and long.fps <= 8
    assert long.split == "train" and len(long.objects) >= 20 and long.cuts


def _pixel_colour(frame: np.ndarray, x: float, y: float) -> np.ndarray:
    h, w = frame.shape[:2]
    cx, cy = int(round(x * w)), int(round(y * h))
    return frame[max(0, cy - 1) : cy + 2, max(0, cx - 1) : cx + 2].reshape(-1, 3).mean(0)


def test_annotations_match_pixels(small_set):
    """What a question asks is what the pixels show: colour at the object's centre, before/after changes."""
    d, paths = small_set
    checked = 0
    for i, p in enumerate(paths[:5]):
        spec = make_spec(i, seed=3, split=json.loads(p.with_suffix(".json").read_text())["split"])
        for o in spec.objects:
            if o.shape in ("ring", "cross"):  # hollow centre / thin arms: the centre pixel is background
                continue
            t_mid = (o.t_in + (o.t_change if o.t_change is not None else o.t_out)) / 2
            ts = [t_mid]
            if o.t_change is not None:
                ts.append((o.t_change + o.t_out) / 2)
            frames = decode_frames(p, ts)
            for t, frame in zip(ts, frames, strict=True):
                x, y = o.pos_at(t)
                got = _pixel_colour(frame, x, y)
                name = o.color_at(t)
                # the nearest palette colour is the annotated one (unless another object covers it)
                dists = {c: np.abs(got - np.array(rgb)).sum() for c, rgb in COLORS.items()}
                if min(dists.values()) < 90:
                    assert min(dists, key=dists.get) == name
                    checked += 1
    assert checked >= 4


def test_shapes_and_mcq_answers_are_consistent():
    for i in range(20):
        spec = make_spec(i, seed=1)
        doc = annotations(spec)
        objs = {f"{o.color} {o.shape}" for o in spec.objects}
        for q in doc["mcq"]:
            ans = q["options"][q["answer"]]
            if q["kind"] == "order":
                first = min(spec.objects, key=lambda o: o.t_in)
                assert ans == f"{first.color} {first.shape}"
            if q["kind"] == "count":
                assert ans == str(len(spec.objects))
            if q["kind"] == "color":
                shape = q["question"].split("the ")[1].split(" when")[0]
                assert shape in SHAPES and any(o.shape == shape and o.color == ans for o in spec.objects)
            if q["kind"] == "change":
                assert ans in objs
            seen = {o.color for o in spec.objects} | {o.new_color for o in spec.objects if o.new_color}
            if q["kind"] == "color_presence":  # the answer is in the video, every other option never is
                assert ans in seen and not (set(q["options"]) - {ans}) & seen
            if q["kind"] == "shape_presence":
                shapes = {o.shape for o in spec.objects}
                assert ans in shapes and not (set(q["options"]) - {ans}) & shapes


def test_cli_entry_point(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--n", "2", "--long", "0", "--seed", "5", "--workers", "1"])
    out = tmp_path / "cli"
    assert len(list(out.glob("evt_*.json"))) == 2
    assert "wrote 2 videos" in capsys.readouterr().out


@pytest.mark.slow
def test_default_set_generates_quickly(tmp_path):
    t = time.perf_counter()
    paths = generate_dataset(tmp_path, n_videos=40, n_long=1, seed=0)
    elapsed = time.perf_counter() - t
    assert len(paths) == 41 and all(p.exists() and p.with_suffix(".json").exists() for p in paths)
    assert probe(paths[-1]).duration == pytest.approx(600.0, abs=0.5)
    assert elapsed < 180  # ~25 s on 2 idle cores; CI boxes are shared and often loaded


def test_long_video_annotations_stay_unambiguous():
    spec = make_spec(
        0, seed=0, long=True, duration=1200.0
    )  # 20 min: more objects than short videos ever have
    doc = annotations(spec)
    names = [(o.color, o.shape) for o in spec.objects] + [
        (o.new_color, o.shape) for o in spec.objects if o.new_color
    ]
    assert len(names) == len(set(names))
    queries = [g["query"] for g in doc["grounding"]]
    assert len(queries) == len(set(queries))
    (count,) = [q for q in doc["mcq"] if q["kind"] == "count"]
    assert count["options"][count["answer"]] == str(len(spec.objects))
    assert all(abs(int(o) - len(spec.objects)) <= 7 for o in count["options"])  # no odd-one-out answer
    assert max(o.t_out for o in spec.objects) <= 1200.0
    assert [e["t"] for e in doc["events"]] == sorted(e["t"] for e in doc["events"])


def test_one_shape_sets_ask_what_the_frames_show():
    """max_objects=1, color_changes=False: every short video has one shape that keeps its colour, so each question's
    answer is what the frames show; "how many" (always one) is not asked; the long video keeps its many shapes."""
    specs = dataset_specs(30, 1, seed=3, max_objects=1, color_changes=False)
    shorts, longs = specs[:-1], specs[-1:]
    assert all(len(s.objects) == 1 and s.objects[0].t_change is None for s in shorts)
    assert len(longs[0].objects) > 1
    kinds = set()
    for s in shorts:
        doc = annotations(s)
        kinds |= {q["kind"] for q in doc["mcq"]}
        assert not any(e["type"] == "color_change" for e in doc["events"])
    assert kinds == {"color", "position", "motion", "order", "shape_presence"}
    assert "count" in {q["kind"] for q in annotations(longs[0])["mcq"]}
    # the same draws as the default set: the one shape is the default video's first shape
    default = dataset_specs(30, 0, seed=3)
    assert [s.objects[0].shape for s in shorts] == [s.objects[0].shape for s in default]
    with pytest.raises(ValueError, match="max_objects"):
        make_spec(0, 0, max_objects=0)


def test_probe_videos_are_new_heldout_draws_of_the_same_generator(tmp_path):
    from keye.datasets.synthetic import probe_specs, write_specs

    kw = {"max_objects": 1, "color_changes": False}
    base = dataset_specs(12, 0, seed=5, heldout_fraction=0.3, **kw)
    probe = probe_specs(12, 4, seed=5, **kw)
    assert [s.name for s in probe] == [f"evt_{i:05d}" for i in (12, 13, 14, 15)]  # after the set's own
    assert {s.name for s in probe}.isdisjoint(s.name for s in base)
    assert all(s.split == "heldout" and len(s.objects) == 1 for s in probe)
    # the same draws as a bigger set would make at those indices (same generator and settings), but held out
    twin = dataset_specs(16, 0, seed=5, heldout_fraction=0.3, **kw)[12:]
    assert [annotations(s)["grounding"] for s in probe] == [annotations(s)["grounding"] for s in twin]
    paths = write_specs(tmp_path, probe[:2], workers=1)
    assert [p.name for p in paths] == [s.filename for s in probe[:2]]
    assert all(p.is_file() and p.with_suffix(".json").is_file() for p in paths)
    assert json.loads(paths[0].with_suffix(".json").read_text())["split"] == "heldout"
