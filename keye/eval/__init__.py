"""Evaluation on the benchmarks the field reports (TimeLens, Video-MME, Video-MME-v2, LongVideoBench), read from
their published file layouts and scored the way their own scripts score them.

    from keye.eval import evaluate, score, write_heldout_benchmarks, write_report
    res = evaluate(predict_fn, bench_file, videos_dir, out_dir)   # predictions.jsonl, metrics.json, report.html
    assert score(bench_file, res.predictions_path) == res.metrics
    predict_fn = keye_predict_fn(checkpoint_dir, tokenizer_dir, sampling_policy)   # a Keye checkpoint
"""

from typing import Any

from keye.eval.export import write_heldout_benchmarks
from keye.eval.readers import KINDS, Benchmark, BenchmarkFormatError, Question, detect_kind, read_benchmark
from keye.eval.runner import EvalResult, evaluate, read_predictions, score
from keye.eval.scoring import flat_metrics, score_answers

__all__ = [
    "KINDS",
    "Benchmark",
    "BenchmarkFormatError",
    "EvalResult",
    "Question",
    "detect_kind",
    "evaluate",
    "flat_metrics",
    "keye_predict_fn",
    "read_benchmark",
    "read_predictions",
    "score",
    "score_answers",
    "write_heldout_benchmarks",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name == "write_report":  # matplotlib is imported only when a report is written
        from keye.eval.report import write_report

        return write_report
    if name == "keye_predict_fn":  # torch and the model are imported only when a checkpoint is evaluated
        from keye.eval.predict import keye_predict_fn

        return keye_predict_fn
    raise AttributeError(name)
