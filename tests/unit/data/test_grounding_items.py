"""Grounding samples on windows of a clip, answered with the exact span or the frames' bracket."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keye.core.config import load_config
from keye.data.grounding_items import (
    GROUNDING_WINDOW_STRIDE,
    GroundingItem,
    frame_span,
    grounding_items,
    grounding_view,
    grounding_window,
)
from keye.data.samples import build_sample, corpus_texts, frame_plan, sample_items
from keye.data.tokenizer import train_bpe

POLICY = load_config(
    Path(__file__).resolve().parents[3] / "pipelines.yaml"
).sampling  # the default frame plan


def _rec(duration: float = 8.0, start: float = 3.3, end: float = 5.6) -> dict:
    return {
        "key": "c0000000000000abc",
        "duration": duration,
        "fps": 10.0,
        "width": 224,
        "height": 168,
        "split": "train",
        "caption": "A red circle appears.",
        "dense_captions": [{"start": start, "end": end, "text": "a red circle is visible"}],
        "grounding": [
            {"query": "a red circle is visible", "start": start, "end": end},
            {"query": "the background changes", "start": 1.0, "end": 1.5},
        ],
        "mcq": [],
    }


@pytest.fixture(scope="module")
def tok():
    return train_bpe(corpus_texts([_rec()]), vocab_size=600)


def _answer(tok, s) -> str:
    return tok.decode(s.input_ids[s.labels != -100].tolist())


def _stamps(tok, s) -> list[float]:
    full = tok.decode(s.input_ids.tolist(), skip_special_tokens=False)
    return [float(x) for x in re.findall(r"<\|time_start\|>([\d.]+) seconds", full)]


@pytest.mark.parametrize(
    ("start", "end", "want"),
    [
        (2.5, 5.5, (2.0, 6.0)),  # shown by frames 3-5: bracketed by frames 2 and 6
        (3.0, 5.0, (2.0, 5.0)),  # starts on frame 3 (shown), ends on frame 5 (not shown: end is exclusive)
        (0.0, 2.2, (0.0, 3.0)),  # shown from frame 0: starts at the clip's start
        (6.5, 8.0, (6.0, 8.0)),  # shown by frame 7, the last: ends at the clip's end
        (4.2, 4.7, (4.0, 5.0)),  # between two frames: bracketed by those two
        (7.3, 7.9, (7.0, 8.0)),  # after the last frame
    ],
)
def test_frame_span_brackets_the_event_with_the_shown_stamps(start, end, want) -> None:
    ts = [float(i) for i in range(8)]
    got = frame_span(start, end, ts, 8.0)
    assert got == want
    assert got[0] <= start and got[1] >= end  # the bracket always contains the event
    assert got[0] in ts and (got[1] in ts or got[1] == 8.0)  # made of stamps the model was shown
    with pytest.raises(ValueError, match="timestamps"):
        frame_span(1.0, 2.0, [], 8.0)


def test_item_layout_round_trips_and_plain_index_is_whole_clip_exact() -> None:
    for it in (GroundingItem(0), GroundingItem(3, 7, 1), GroundingItem(999, 64, 0)):
        assert GroundingItem.decode(it.encode()) == it
    assert GroundingItem.decode(2) == GroundingItem(2, 0, 0)
    assert GroundingItem(1, 2, 1).encode() == 1 + 2 * GROUNDING_WINDOW_STRIDE + 1_000_000


def test_windows_are_deterministic_inside_the_clip_and_hold_the_event() -> None:
    rec = _rec(duration=12.0, start=7.1, end=8.4)
    seen = set()
    for k in range(1, 40):
        w = grounding_window(rec, 0, k)
        assert w == grounding_window(dict(rec), 0, k)  # from the key, not from state
        assert w is not None
        a, length = w
        seen.add(w)
        assert 0.0 <= a and a + length <= 12.0 + 1e-9 and length >= 3.0 - 0.1 - 1e-9
        assert (
            abs(a * 10 - round(a * 10)) < 1e-6 and abs(length * 10 - round(length * 10)) < 1e-6
        )  # whole frames
        assert min(8.4, a + length) - max(7.1, a) >= 0.3 - 1e-9
    assert len(seen) > 30  # windows differ
    assert grounding_window(_rec(duration=2.0, start=0.5, end=1.5), 0, 1) is None  # too short for a window
    with pytest.raises(ValueError, match="window"):
        grounding_window(rec, 0, 0)
    with pytest.raises(ValueError, match="grounding answer"):
        grounding_items(rec, "bracket")
    with pytest.raises(ValueError, match="windows"):
        grounding_items(rec, "exact", 65)


def test_window_sample_is_stamped_from_its_start_and_decodes_the_right_frames(tok) -> None:
    rec = _rec(duration=12.0, start=7.1, end=8.4)
    item = GroundingItem(0, 5, 0).encode()
    view, a = grounding_view(rec, item)
    length = view["duration"]
    s = build_sample(tok, rec, "grounding", item, POLICY)
    plan = frame_plan(view, POLICY)
    assert _stamps(tok, s) == pytest.approx(
        [round(t, 1) for t in plan.timestamps]
    )  # stamps from the window's 0
    assert s.timestamps == pytest.approx([a + t for t in plan.timestamps])  # frames decoded from the clip
    g = view["grounding"][0]
    assert g["start"] == pytest.approx(max(7.1, a) - a, abs=1e-3) and g["end"] <= length + 1e-9
    assert _answer(tok, s) == f"The event happens in {g['start']:.1f} - {g['end']:.1f} seconds"
    assert s.sample_id == f"{rec['key']}:grounding:{item}"
    assert rec["duration"] == 12.0 and rec["grounding"][0]["start"] == 7.1  # the record is not changed


def test_frames_answer_copies_two_shown_stamps_and_follows_dropped_frames(tok) -> None:
    rec = _rec(duration=8.0, start=3.3, end=5.6)
    item = GroundingItem(0, 0, 1).encode()
    s = build_sample(tok, rec, "grounding", item, POLICY)
    assert _stamps(tok, s) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert _answer(tok, s) == "The event happens in 3.0 - 6.0 seconds"
    cut = build_sample(tok, rec, "grounding", item, POLICY, keep_frames=4)  # the pack stage dropped frames
    assert _stamps(tok, cut) == [0.0, 2.0, 4.0, 6.0]
    assert _answer(tok, cut) == "The event happens in 2.0 - 6.0 seconds"


def test_sample_items_lists_whole_clip_then_windows_per_query() -> None:
    rec = _rec(duration=12.0, start=7.1, end=8.4)
    assert sample_items(rec, ["grounding"]) == [("grounding", 0), ("grounding", 1)]
    items = [i for _, i in sample_items(rec, ["grounding"], grounding_answer="frames", grounding_windows=3)]
    decoded = [GroundingItem.decode(i) for i in items]
    assert [(d.query, d.window, d.answer) for d in decoded] == [
        (q, k, 1) for q in (0, 1) for k in range(4)
    ]  # a 12 s clip holds both events in every drawn window here
