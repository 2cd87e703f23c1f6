"""Subtitle layouts (SubRip, Video-MME-v2 word JSONL, LongVideoBench JSON): written then read back."""

import pytest

from keye.eval.subtitles import (
    Subtitle,
    clock_to_seconds,
    read_lvb_json,
    read_srt,
    read_word_jsonl,
    seconds_to_clock,
    write_lvb_json,
    write_srt,
    write_word_jsonl,
)

CUES = [
    Subtitle(0.5, 2.0, "hello there."),
    Subtitle(3.25, 4.0, "second line"),
    Subtitle(3725.1, 3726.0, "late"),
]


def test_clock_conversions():
    assert clock_to_seconds("01:02:03,500") == pytest.approx(3723.5)
    assert clock_to_seconds("00:00:12.000") == 12.0
    assert clock_to_seconds("02:05") == 125.0
    assert seconds_to_clock(3723.5) == "01:02:03.500"
    assert seconds_to_clock(3723.5, ",") == "01:02:03,500"


def test_srt_roundtrip(tmp_path):
    write_srt(tmp_path / "a.srt", CUES)
    assert "00:00:00,500 --> 00:00:02,000" in (tmp_path / "a.srt").read_text()
    assert read_srt(tmp_path / "a.srt") == CUES


def test_lvb_roundtrip_with_offset(tmp_path):
    write_lvb_json(tmp_path / "a_en.json", CUES)
    back = read_lvb_json(tmp_path / "a_en.json", offset=0.5)
    assert [(c.start, c.end, c.text) for c in back] == [(c.start - 0.5, c.end - 0.5, c.text) for c in CUES]


def test_word_jsonl_regroups_phrases(tmp_path):
    write_word_jsonl(tmp_path / "001.jsonl", CUES)
    back = read_word_jsonl(tmp_path / "001.jsonl")
    assert [c.text for c in back] == [c.text for c in CUES]
    assert back[0].start == 0.5 and back[0].end == pytest.approx(2.0)


def test_bad_srt_time_names_file(tmp_path):
    (tmp_path / "b.srt").write_text("1\n00:00:xx,000 --> 00:00:02,000\nhi\n")
    with pytest.raises(ValueError, match="b.srt"):
        read_srt(tmp_path / "b.srt")
