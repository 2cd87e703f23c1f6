"""Each reader on small files in the benchmark's published layout; layout detection; clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keye.eval.readers import BenchmarkFormatError, detect_kind, read_benchmark


def _touch(d, *names):
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"\x00")


def _timelens(tmp_path):
    path = tmp_path / "charades-timelens.json"
    path.write_text(
        json.dumps(
            {
                "AO8RW": {
                    "duration": 30.5,
                    "spans": [[1.0, 4.5], [10, 12]],
                    "queries": ["a person  opens a door.", "someone sits"],
                },
                "Y6R7T": {"duration": 12.0, "spans": [[0.0, 3.0]], "queries": ["person laughing"]},
            }
        )
    )
    return path


def test_timelens_reader(tmp_path):
    path = _timelens(tmp_path)
    _touch(tmp_path / "videos", "AO8RW.mp4", "Y6R7T.mkv")
    bench = read_benchmark(path, tmp_path / "videos")
    assert bench.kind == "timelens" == detect_kind(path)
    q = bench.questions
    assert [x.id for x in q] == ["AO8RW#0", "AO8RW#1", "Y6R7T#0"]
    assert q[0].question == "a person opens a door"  # TimeLens query cleaning
    assert q[1].spans == [(10.0, 12.0)] and q[1].duration == 30.5
    assert q[0].video == tmp_path / "videos" / "AO8RW.mp4"
    assert q[2].video.name == "Y6R7T.mkv"
    assert q[0].task == "charades-timelens"


def _videomme_rows():
    base = {
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": "https://x",
    }
    return [
        {
            **base,
            "video_id": "001",
            "videoID": "fFjv93ACGo8",
            "question_id": "001-1",
            "task_type": "Counting Problem",
            "question": "How many?",
            "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."],
            "answer": "C",
        },
        {
            **base,
            "video_id": "001",
            "videoID": "fFjv93ACGo8",
            "question_id": "001-2",
            "task_type": "OCR Problems",
            "question": "What is written?",
            "options": ["A. x", "B. y", "C. z", "D. w"],
            "answer": "A",
        },
        {
            **base,
            "duration": "long",
            "video_id": "601",
            "videoID": "longvid",
            "question_id": "601-1",
            "task_type": "OCR Problems",
            "question": "Which?",
            "options": ["A. p", "B. q", "C. r", "D. s"],
            "answer": "D",
        },
    ]


def test_videomme_parquet_reader_with_srt_subtitles(tmp_path):
    root = tmp_path / "Video-MME"
    path = root / "videomme" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_videomme_rows()), path)
    (root / "subtitle").mkdir()
    (root / "subtitle" / "fFjv93ACGo8.srt").write_text(
        "1\n00:00:01,000 --> 00:00:02,500\nhello <i>there</i>\n\n2\n00:01:00,000 --> 00:01:01,000\nbye\n"
    )
    _touch(root / "data", "fFjv93ACGo8.mp4", "longvid.mp4")
    assert detect_kind(path) == "videomme"
    bench = read_benchmark(path, root)
    q = bench.questions
    assert [x.id for x in q] == ["001-1", "001-2", "601-1"]
    assert q[0].options == ["1.", "2.", "3.", "4."] and q[0].answer == "C"
    assert q[0].duration_group == "short" and q[2].duration_group == "long"
    assert q[0].task == "Counting Problem"
    assert q[0].video == root / "data" / "fFjv93ACGo8.mp4"
    assert [(s.start, s.end, s.text) for s in q[0].subtitles] == [
        (1.0, 2.5, "hello there"),
        (60.0, 61.0, "bye"),
    ]
    assert q[2].subtitles == []  # no subtitle file: no cues


def test_videomme_grouped_json_template(tmp_path):
    path = tmp_path / "output_test_template.json"
    path.write_text(
        json.dumps(
            [
                {
                    "video_id": "001",
                    "duration_category": "short",
                    "video_category": "Knowledge",
                    "video_subcategory": "Humanity & History",
                    "questions": [
                        {
                            "question_id": "001-1",
                            "task_type": "Object Reasoning",
                            "question": "Q?",
                            "choices": ["A. a", "B. b", "C. c", "D. d"],
                            "answer": "A",
                            "response": "D",
                        }
                    ],
                }
            ]
        )
    )
    bench = read_benchmark(path)
    assert bench.kind == "videomme"
    assert bench.questions[0].id == "001-1" and bench.questions[0].duration_group == "short"
    assert bench.questions[0].options == ["a", "b", "c", "d"]


def _v2_rows():
    opts = "\n".join(f"{L}. option {L}" for L in "ABCDEFGH")
    rows = []
    for g, (gtype, structure) in enumerate([("relevance", None), ("logic", "[1, [2, 3], 4]")]):
        for k in range(4):
            rows.append(
                {
                    "video_id": f"{g + 1:03d}",
                    "question": f"q{g}{k}",
                    "options": opts,
                    "answer": "ABCDEFGH"[k],
                    "level": g + 1,
                    "group_type": gtype,
                    "group_structure": structure,
                    "second_head": "Temporal" if g else "Perception",
                    "third_head": "t",
                }
            )
    return rows


def test_videomme_v2_reader(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(_v2_rows()), path)
    (tmp_path / "subtitle").mkdir()
    words = [
        {"text": "Hello", "start_time": 0.5, "end_time": 0.8},
        {"text": "world.", "start_time": 0.8, "end_time": 1.1},
        {"text": "Next", "start_time": 3.0, "end_time": 3.2},
    ]
    (tmp_path / "subtitle" / "001.jsonl").write_text("".join(json.dumps(w) + "\n" for w in words))
    _touch(tmp_path / "videos", "001.mp4", "002.mp4")
    assert detect_kind(path) == "videomme_v2"
    q = read_benchmark(path, tmp_path / "videos").questions
    assert (
        len(q) == 8 and q[0].id == "0" and q[7].id == "7"
    )  # no question_id column: row index, as officially
    assert len(q[0].options) == 8 and q[0].options[7] == "option H" and q[3].answer == "D"
    assert {x.group for x in q[:4]} == {"g0"} and {x.group for x in q[4:]} == {"g1"}
    assert q[4].group_type == "logic" and q[4].group_structure == "[1, [2, 3], 4]"
    assert q[0].group_structure is None and q[5].extra["level"] == 2
    assert [(s.start, s.end, s.text) for s in q[0].subtitles] == [
        (0.5, 1.1, "Hello world."),
        (3.0, 3.2, "Next"),
    ]


def test_videomme_v2_rejects_partial_groups(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(_v2_rows()[:6]), path)
    with pytest.raises(BenchmarkFormatError, match="groups are 4 consecutive rows"):
        read_benchmark(path)


def _lvb(tmp_path):
    rows = [
        {
            "video_id": "86CxyhFV9MI",
            "question": "Which subtitles appear?",
            "question_wo_referring_query": "Which?",
            "candidates": ["one", "two", "three", "four"],
            "correct_choice": 1,
            "position": [854, 948],
            "topic_category": "NP-News-Programs",
            "question_category": "TOS",
            "level": "L2-Relation",
            "id": "86CxyhFV9MI_0",
            "video_path": "86CxyhFV9MI.mp4",
            "subtitle_path": "86CxyhFV9MI_en.json",
            "duration_group": 600,
            "starting_timestamp_for_subtitles": 10.0,
            "duration": 190.16,
            "view_count": 259852,
        },
        {
            "video_id": "abc",
            "question": "What happens?",
            "candidates": ["x", "y", "z", "w", "v"],
            "correct_choice": 4,
            "question_category": "S2E",
            "id": "abc_0",
            "video_path": "abc.mp4",
            "subtitle_path": "abc_en.json",
            "duration_group": 15,
            "starting_timestamp_for_subtitles": 0,
            "duration": 12.0,
        },
    ]
    path = tmp_path / "lvb_val.json"
    path.write_text(json.dumps(rows))
    (tmp_path / "subtitles").mkdir()
    (tmp_path / "subtitles" / "86CxyhFV9MI_en.json").write_text(
        json.dumps(
            [
                {"start": "00:00:12.000", "end": "00:00:13.500", "line": "hi"},
                {"timestamp": [20.0, 21.0], "text": "yo"},
            ]
        )
    )
    _touch(tmp_path / "videos", "86CxyhFV9MI.mp4", "abc.mp4")
    return path


def test_longvideobench_reader(tmp_path):
    path = _lvb(tmp_path)
    assert detect_kind(path) == "longvideobench"
    q = read_benchmark(path, tmp_path).questions
    assert [x.id for x in q] == ["86CxyhFV9MI_0", "abc_0"]
    assert q[0].answer == "B" and q[1].answer == "E" and len(q[1].options) == 5
    assert q[0].duration_group == "600" and q[0].task == "TOS"
    assert q[0].video == tmp_path / "videos" / "86CxyhFV9MI.mp4"
    # times shifted by starting_timestamp_for_subtitles
    assert [(s.start, s.end, s.text) for s in q[0].subtitles] == [(2.0, 3.5, "hi"), (10.0, 11.0, "yo")]
    assert q[1].subtitles == []


def test_missing_video_is_named(tmp_path):
    path = _timelens(tmp_path)
    _touch(tmp_path / "videos", "AO8RW.mp4")
    with pytest.raises(FileNotFoundError, match=r"Y6R7T.*question Y6R7T#0"):
        read_benchmark(path, tmp_path / "videos")


def test_missing_field_names_file_and_field(tmp_path):
    rows = _videomme_rows()
    del rows[1]["answer"]
    path = tmp_path / "vmme.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(BenchmarkFormatError, match=r"vmme.json \[row 1\]: missing field 'answer'"):
        read_benchmark(path)
    bad = tmp_path / "lvb_val.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "video_id": "a",
                    "candidates": ["x", "y"],
                    "correct_choice": 5,
                    "id": "a_0",
                    "video_path": "a.mp4",
                    "subtitle_path": "a_en.json",
                    "question": "?",
                }
            ]
        )
    )
    with pytest.raises(BenchmarkFormatError, match="correct_choice"):
        read_benchmark(bad)
    tl = tmp_path / "tl.json"
    tl.write_text(json.dumps({"v": {"duration": 5, "spans": [[0, 1]], "queries": ["a", "b"]}}))
    with pytest.raises(BenchmarkFormatError, match=r"1 spans but 2 queries"):
        read_benchmark(tl)


def test_unknown_layout_and_kind_mismatch(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(BenchmarkFormatError, match="matches none of"):
        detect_kind(path)
    with pytest.raises(BenchmarkFormatError, match="laid out as timelens"):
        read_benchmark(_timelens(tmp_path), kind="videomme")


def test_given_kind_must_fit_the_file_shape(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(BenchmarkFormatError, match="holds an object"):
        read_benchmark(path, kind="timelens")
    with pytest.raises(BenchmarkFormatError, match=r"\[row 0\]: missing field 'question_id'"):
        read_benchmark(path, kind="videomme")


def test_answer_must_be_a_letter(tmp_path):
    rows = _videomme_rows()
    rows[0]["answer"] = "Apple"
    path = tmp_path / "vmme.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(BenchmarkFormatError, match="field 'answer' = 'Apple'"):
        read_benchmark(path)
