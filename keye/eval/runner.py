"""The eval stage: questions -> batched answers -> predictions.jsonl + metrics.json (+ report.html), and the
re-scoring of saved predictions, which goes through the same scoring code and so gives the same numbers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.core.atomic import atomic_write_json, atomic_write_text
from keye.eval.predictions import read_predictions_checked
from keye.eval.readers import Question, read_benchmark
from keye.eval.scoring import score_answers

PredictFn = Callable[[list[Question]], list[str]]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions_path: Path
    metrics_path: Path
    report_path: Path | None


def read_predictions(path: str | Path) -> dict[str, str]:
    """{question id: raw answer} from a predictions.jsonl ({"id", "answer", ...} per line); any bad line is an error."""
    return read_predictions_checked(path).answers


def evaluate(
    predict_fn: PredictFn,
    bench_path: str | Path,
    videos_dir: str | Path,
    out_dir: str | Path,
    kind: str | None = None,
    batch_size: int = 8,
    subtitles_dir: str | Path | None = None,
    limit: int | None = None,
    previous_metrics: dict[str, Any] | None = None,
    report: bool = True,
) -> EvalResult:
    """Answer every question of `bench_path` with `predict_fn` (a batch of Questions -> raw answer texts, in
    order), then write predictions.jsonl, metrics.json and, with `report`, report.html into `out_dir`.
    `limit` keeps the first N questions (whole Video-MME-v2 groups: N is rounded up to a multiple of 4)."""
    bench = read_benchmark(bench_path, videos_dir, kind=kind, subtitles_dir=subtitles_dir)
    if limit is not None:
        n = -(-limit // 4) * 4 if bench.kind == "videomme_v2" else limit
        bench.questions = bench.questions[:n]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers: dict[str, str] = {}
    started = time.perf_counter()
    for i in range(0, len(bench.questions), max(batch_size, 1)):
        batch = bench.questions[i : i + max(batch_size, 1)]
        texts = predict_fn(batch)
        if len(texts) != len(batch):
            raise ValueError(
                f"predict_fn returned {len(texts)} answers for a batch of {len(batch)} questions"
            )
        for q, text in zip(batch, texts, strict=True):
            answers[q.id] = "" if text is None else str(text)
    seconds = time.perf_counter() - started
    metrics, records = score_answers(bench, answers)
    if limit is not None:
        metrics["limit"] = limit
    predictions_path, metrics_path = out_dir / "predictions.jsonl", out_dir / "metrics.json"
    atomic_write_text(predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(metrics_path, metrics)
    report_path = None
    if report:
        from keye.eval.report import write_report

        report_path = write_report(
            {bench.kind: metrics},
            out_dir,
            predictions={bench.kind: predictions_path},
            previous={bench.kind: previous_metrics} if previous_metrics else None,
            notes={"generation seconds": f"{seconds:.1f}", "questions": str(len(bench.questions))},
        )
    return EvalResult(metrics, predictions_path, metrics_path, report_path)


def score(
    bench_path: str | Path,
    predictions_path: str | Path,
    kind: str | None = None,
    subtitles_dir: str | Path | None = None,
    limit: int | None = None,
    lenient: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-score saved predictions against the benchmark file (no videos needed). With the same `limit` as the
    run, the result equals the run's metrics.json. Bad prediction lines are errors; with `lenient` each is passed
    to `warn` and counted under metrics["prediction_problems"]."""
    bench = read_benchmark(bench_path, None, kind=kind, subtitles_dir=subtitles_dir)
    read = read_predictions_checked(predictions_path, {q.id for q in bench.questions}, lenient=lenient)
    if limit is not None:
        n = -(-limit // 4) * 4 if bench.kind == "videomme_v2" else limit
        bench.questions = bench.questions[:n]
    metrics, _ = score_answers(bench, read.answers)
    if limit is not None:
        metrics["limit"] = limit
    if lenient:
        for line in read.warnings:
            (warn or print)(line)
        metrics["prediction_problems"] = read.counts
    return metrics
