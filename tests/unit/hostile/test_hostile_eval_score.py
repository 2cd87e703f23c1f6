"""Issue 16, finding 6: `keye eval score` refuses bad prediction files (empty, malformed, unknown or duplicate ids)
with file:line, or with --lenient warns and counts them in the metrics."""

import json
import subprocess
import sys

from test_eval_readers import _timelens


def _keye(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "keye.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _preds(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = [{"id": "AO8RW#0", "answer": "1 - 4.5 seconds"}, {"id": "AO8RW#1", "answer": "from 11s to 13s"}]


def test_eval_score_refuses_bad_predictions(tmp_path):
    bench = _timelens(tmp_path)
    cases = {
        "empty": ([], "no predictions"),
        "malformed": ([GOOD[0], "{not json"], "malformed.jsonl:2"),
        "unknown": ([*GOOD, {"id": "NOPE#9", "answer": "1-2"}], "not in the benchmark"),
        "duplicate": ([*GOOD, {"id": "AO8RW#0", "answer": "3-4"}], "duplicate.jsonl:3"),
    }
    for name, (rows, needle) in cases.items():
        p = _preds(tmp_path / f"{name}.jsonl", rows)
        r = _keye("eval", "score", "--bench", str(bench), "--predictions", str(p), cwd=tmp_path)
        assert r.returncode != 0, (name, r.stdout)
        assert needle in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr
    ok = _keye(
        "eval",
        "score",
        "--bench",
        str(bench),
        "--predictions",
        str(_preds(tmp_path / "ok.jsonl", GOOD)),
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr


def test_eval_score_lenient_warns_and_counts(tmp_path):
    bench = _timelens(tmp_path)
    rows = [*GOOD, "oops", {"id": "NOPE#9", "answer": "1-2"}, {"id": "AO8RW#0", "answer": "3-4"}]
    p = _preds(tmp_path / "p.jsonl", rows)
    r = _keye("eval", "score", "--bench", str(bench), "--predictions", str(p), "--lenient", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "p.jsonl:3" in r.stderr and "p.jsonl:4" in r.stderr and "p.jsonl:5" in r.stderr
    m = json.loads(r.stdout)
    assert m["prediction_problems"] == {"malformed": 1, "unknown_ids": 1, "duplicate_ids": 1}
    assert m["n"] == 3
