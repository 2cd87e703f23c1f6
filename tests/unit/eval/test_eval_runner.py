"""The eval stage end to end on small files: held-out export in the published layouts, evaluate() with a scripted
predict_fn (hand-computed metrics), score() == the run's metrics.json, and the HTML report."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_eval_readers import _timelens, _touch, _v2_rows, _videomme_rows

from keye.eval.export import write_heldout_benchmarks
from keye.eval.readers import detect_kind, read_benchmark
from keye.eval.runner import evaluate, read_predictions, score
from keye.eval.scoring import flat_metrics


def _scripted(answers):
    def predict(questions):
        return [answers[q.id] for q in questions]

    return predict


def _check_rescore(result, bench_path):
    saved = json.loads(result.metrics_path.read_text())
    assert saved == result.metrics
    assert score(bench_path, result.predictions_path) == saved


def test_timelens_eval_hand_computed(tmp_path):
    path = _timelens(tmp_path)
    _touch(tmp_path / "videos", "AO8RW.mp4", "Y6R7T.mp4")
    answers = {
        "AO8RW#0": "The event happens in 1 - 4.5 seconds",  # IoU 1
        "AO8RW#1": "from 11s to 13s",  # gt 10-12: IoU 1/3
        "Y6R7T#0": "I cannot tell",  # unparsable: IoU 0
    }
    res = evaluate(_scripted(answers), path, tmp_path / "videos", tmp_path / "out", batch_size=2)
    m = res.metrics
    assert m["R1@0.3"] == pytest.approx(200 / 3)
    assert m["R1@0.5"] == pytest.approx(100 / 3)
    assert m["R1@0.7"] == pytest.approx(100 / 3)
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3) / 3)
    assert m["n_unparsable"] == 1 and m["n"] == 3
    assert 0 < m["chance"]["mIoU"] < m["mIoU"]
    rows = [json.loads(x) for x in res.predictions_path.read_text().splitlines()]
    assert rows[1] == {**rows[1], "id": "AO8RW#1", "answer": "from 11s to 13s", "parsed": [11.0, 13.0]}
    assert rows[2]["unparsable"] is True and rows[2]["iou"] == 0.0
    _check_rescore(res, path)
    html = res.report_path.read_text()
    assert "<table" in html and "data:image/png;base64," in html and "TimeLens" in html
    assert (tmp_path / "out" / "timelens_iou_hist.png").is_file()


def test_videomme_eval_hand_computed_and_previous_in_report(tmp_path):
    path = tmp_path / "videomme.parquet"
    pq.write_table(pa.Table.from_pylist(_videomme_rows()), path)
    _touch(tmp_path / "videos", "fFjv93ACGo8.mp4", "longvid.mp4")
    answers = {"001-1": "The best answer is C.", "001-2": "B", "601-1": "hmm, hard to say"}
    prev = {
        "kind": "videomme",
        "primary": "accuracy",
        "accuracy": 10.0,
        "by_task": {"OCR Problems": {"accuracy": 0.0}},
    }
    res = evaluate(_scripted(answers), path, tmp_path / "videos", tmp_path / "out", previous_metrics=prev)
    m = res.metrics
    assert m["accuracy"] == pytest.approx(100 / 3)
    assert m["accuracy_answered"] == pytest.approx(50.0)  # the official script's denominator
    assert m["chance"] == {"accuracy": 25.0}
    assert m["by_duration"]["short"]["accuracy"] == 50.0 and m["by_duration"]["long"]["accuracy"] == 0.0
    assert m["by_task"]["Counting Problem"] == {"n": 1, "accuracy": 100.0, "chance": 25.0}
    _check_rescore(res, path)
    html = res.report_path.read_text()
    assert "previous" in html and "10.00" in html  # the previous checkpoint's score is in the table
    flat = flat_metrics(m)
    assert flat["by_task/Counting Problem/accuracy"] == 100.0 and "kind" not in flat


def test_videomme_v2_eval_hand_computed(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(_v2_rows()), path)
    _touch(tmp_path / "videos", "001.mp4", "002.mp4")
    # group 0 (relevance): 3 of 4 right -> 56.25; group 1 (logic [1, [2, 3], 4]): right, wrong, right, right -> 400/12
    answers = {"0": "A", "1": "B", "2": "C", "3": "H", "4": "A", "5": "H", "6": "Final Answer: C.", "7": "D"}
    m = evaluate(_scripted(answers), path, tmp_path / "videos", tmp_path / "out").metrics
    assert m["relevance_score"] == pytest.approx(56.25)
    assert m["logic_score"] == pytest.approx(400 / 12)
    assert m["nonlin_score"] == pytest.approx((56.25 + 400 / 12) / 2)
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["relevance_linear_score"] == pytest.approx(75.0)
    assert m["by_level"]["level_1"]["nonlin_score"] == pytest.approx(56.25)
    assert m["by_task"]["Temporal"]["nonlin_score"] == pytest.approx(400 / 12)
    assert 0 < m["chance"]["nonlin_score"] < m["chance"]["accuracy"] == 12.5


def test_missing_and_unparsable_predictions_count_wrong(tmp_path):
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(_videomme_rows()))
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(
        json.dumps({"id": "001-1", "answer": "C"}) + "\n" + json.dumps({"id": "001-2", "answer": "??"}) + "\n"
    )
    m = score(path, preds)
    assert m["n_missing"] == 1 and m["n_unparsable"] == 2 and m["accuracy"] == pytest.approx(100 / 3)
    assert read_predictions(preds) == {"001-1": "C", "001-2": "??"}


def test_predict_fn_must_answer_every_question(tmp_path):
    path = _timelens(tmp_path)
    _touch(tmp_path / "videos", "AO8RW.mp4", "Y6R7T.mp4")
    with pytest.raises(ValueError, match="returned 1 answers for a batch of 3"):
        evaluate(lambda qs: ["x"], path, tmp_path / "videos", tmp_path / "out", batch_size=8, report=False)


def _sidecar(d, stem, split, n_four, n_eight, subtitles=True, ext=".mp4"):
    ann = {
        "schema": "keye.annotations/v1",
        "video": stem + ext,
        "duration": 8.0,
        "split": split,
        "caption": "c",
        "grounding": [{"query": f"{stem} event {k}", "start": 1.0 + k, "end": 2.5 + k} for k in range(2)],
        "mcq": [
            {
                "question": f"{stem} four {k}?",
                "options": ["red", "blue", "green", "yellow"],
                "answer": k % 4,
                "start": 0.0,
                "end": 8.0,
                "kind": "color",
            }
            for k in range(n_four)
        ]
        + [
            {
                "question": f"{stem} eight {k}?",
                "options": [f"o{i}" for i in range(8)],
                "answer": (k + 3) % 8,
                "start": 0.0,
                "end": 8.0,
                "kind": "order",
            }
            for k in range(n_eight)
        ],
    }
    if subtitles:
        ann["subtitles"] = [{"start": 0.5, "end": 2.0, "text": f"{stem} says hello there"}]
    (d / ann["video"]).write_bytes(b"\x00")
    path = d / f"{stem}.json"
    path.write_text(json.dumps(ann))
    return path


def test_heldout_export_roundtrips_through_the_readers(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    anns = [
        _sidecar(vids, "evt_00001", "heldout", 2, 3),
        _sidecar(vids, "evt_00002", "heldout", 3, 2, subtitles=False, ext=".webm"),
        _sidecar(vids, "evt_00003", "heldout", 1, 2),
        _sidecar(vids, "evt_00004", "train", 4, 4),  # not held out: excluded
    ]
    out = write_heldout_benchmarks(anns, vids, tmp_path / "bench")
    assert set(out) == {"timelens", "videomme", "videomme_v2", "longvideobench"}
    assert out["longvideobench"].name == "lvb_val.json" and out["videomme_v2"].name == "test.parquet"
    for kind, path in out.items():
        assert detect_kind(path) == kind
    tl = read_benchmark(out["timelens"], vids).questions
    assert len(tl) == 6 and tl[0].spans == [(1.0, 2.5)] and tl[2].video.suffix == ".webm"
    vm = read_benchmark(out["videomme"], vids).questions
    assert len(vm) == 6 and vm[0].id == "001-1" and vm[0].duration_group == "short"
    assert vm[0].options == ["red", "blue", "green", "yellow"] and vm[1].answer == "B"
    assert vm[0].subtitles[0].text == "evt_00001 says hello there"
    v2 = read_benchmark(out["videomme_v2"], vids).questions
    assert len(v2) == 4 and len(v2[0].options) == 8  # 7 eight-option MCQs -> one group of 4, 3 left out
    assert v2[0].answer == "D" and v2[0].subtitles[0].text == "evt_00001 says hello there"
    lvb = read_benchmark(out["longvideobench"], vids).questions
    assert len(lvb) == 6 and lvb[0].duration_group == "15" and lvb[0].subtitles[0].start == 0.5
    raw = json.loads(out["longvideobench"].read_text())
    assert {
        "video_id",
        "candidates",
        "correct_choice",
        "subtitle_path",
        "duration_group",
        "starting_timestamp_for_subtitles",
        "question_category",
        "id",
        "video_path",
    } <= set(raw[0])
    assert (tmp_path / "bench" / "videomme" / "subtitle" / "evt_00001.srt").is_file()

    # Default-pipeline shape: an oracle on every held-out set, re-scored from the saved predictions.
    for kind, path in out.items():

        def oracle(qs):
            return [
                f"The event happens in {q.spans[0][0]} - {q.spans[0][1]} seconds"
                if q.is_grounding
                else q.answer
                for q in qs
            ]

        res = evaluate(oracle, path, vids, tmp_path / "eval" / kind, report=False)
        primary = res.metrics["primary"]
        assert res.metrics[primary] == pytest.approx(100.0), kind
        _check_rescore(res, path)


def test_export_names_missing_video(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    ann = _sidecar(vids, "evt_00001", "heldout", 1, 0)
    (vids / "evt_00001.mp4").unlink()
    with pytest.raises(FileNotFoundError, match="evt_00001.mp4"):
        write_heldout_benchmarks([ann], vids, tmp_path / "bench")


def test_blank_frame_control_pairs_real_and_blank_answers(tmp_path):
    """keye.eval.heldout.blank_frame_control asks the pooled MCQs again with blank frames and compares question by
    question; a scripted predict_fn that is right only when it sees the frames (and answers "A" blind)."""
    from keye.eval.heldout import (
        BenchSet,
        blank_frame_control,
        control_metrics,
        describe_control,
        pooled_mcq_significance,
        run_benchmarks,
    )

    vids = tmp_path / "videos"
    vids.mkdir()
    anns = [_sidecar(vids, f"evt_0000{i}", "heldout", 8, 4) for i in range(1, 4)]
    files = write_heldout_benchmarks(anns, vids, tmp_path / "bench")
    sets = [BenchSet(vids, files)]
    calls = []

    def predict(questions, blank_frames=False):
        calls.append(blank_frames)
        if blank_frames:
            return ["A" for _ in questions]
        return ["The event happens in 1 - 2 seconds" if q.is_grounding else q.answer for q in questions]

    results = run_benchmarks(predict, sets, tmp_path / "real", batch_size=4, limit=None)
    control = blank_frame_control(predict, sets, results, tmp_path / "blank", batch_size=4, limit=None)
    assert True in calls and False in calls
    real, blank, paired = control["real"], control["blank"], control["real_vs_blank"]
    assert real == pooled_mcq_significance(results) and real["accuracy"] == 100.0
    n = real["n"]
    assert n == 24 + 12 and blank["n"] == n and paired["n"] == n  # 4-option (Video-MME) + 8-option (v2) MCQs
    right_blind = sum(
        q.answer == "A" for m in ("videomme", "videomme_v2") for q in read_benchmark(files[m]).questions
    )
    assert paired["right_only_in_control"] == 0 and paired["right_only_here"] == n - right_blind
    assert blank["correct"] == right_blind and paired["p_value"] < 1e-6
    # LongVideoBench is not pooled; grounding is asked blind too
    assert set(control["blank_predictions"]) == {"timelens", "videomme", "videomme_v2"}
    g = control["grounding"]["timelens"]  # real answers "1 - 2", blind answers "A" (unparsable: IoU 0)
    real_ious = [
        json.loads(x)["iou"] for x in Path(results["timelens"]["_predictions"]).read_text().splitlines()
    ]
    assert g["n"] == len(real_ious) > 0 and g["base_mean"] == 0.0
    assert g["new_mean"] == pytest.approx(100 * sum(real_ious) / len(real_ious))
    assert g["better"] == sum(v > 0 for v in real_ious) and g["worse"] == 0
    metrics = control_metrics(control)
    assert metrics["vision/timelens_mIoU"] == g["new_mean"] and metrics["vision/timelens_blank_mIoU"] == 0.0
    assert "timelens mIoU" in describe_control(control)
    assert json.loads((tmp_path / "blank" / "vision_control.json").read_text()) == json.loads(
        json.dumps(control, sort_keys=True)
    )
