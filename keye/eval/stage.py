"""The eval stage: held-out benchmarks built from the VideoSet's annotations, a checkpoint answering them, the report.

The held-out split is written in the published layouts (TimeLens, Video-MME, Video-MME-v2, LongVideoBench) so the
pipeline's numbers go through the same readers and scorers as the real benchmarks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.eval.export import write_heldout_benchmarks
from keye.eval.metrics import mcq_significance
from keye.eval.readers import read_benchmark
from keye.eval.runner import evaluate, score


@dataclass
class BenchSet:
    """Benchmark files of one folder of videos: {kind: path}."""

    videos_dir: Path
    files: dict[str, Path]


def heldout_benchmarks(video_paths: list[str], out_dir: Path, split: str = "heldout") -> list[BenchSet]:
    """Benchmarks from the `<stem>.json` sidecars of the given videos (grouped by folder; benchmarks resolve videos
    from one folder)."""
    by_dir: dict[Path, list[Path]] = defaultdict(list)
    for v in video_paths:
        ann = Path(v).with_suffix(".json")
        if ann.is_file():
            by_dir[Path(v).parent].append(ann)
    sets = []
    for i, (videos_dir, anns) in enumerate(sorted(by_dir.items())):
        files = write_heldout_benchmarks(anns, videos_dir, out_dir / f"set{i}", split=split)
        if files:
            sets.append(BenchSet(videos_dir, files))
    return sets


def run_benchmarks(
    predict_fn: Any, sets: list[BenchSet], out_dir: Path, batch_size: int, limit: int | None
) -> dict[str, dict[str, Any]]:
    """{name: metrics} for every benchmark file, each checked against a re-score of its saved predictions."""
    results: dict[str, dict[str, Any]] = {}
    for i, bs in enumerate(sets):
        for kind, path in sorted(bs.files.items()):
            name = kind if len(sets) == 1 else f"{kind}-{i}"
            res = evaluate(
                predict_fn,
                path,
                bs.videos_dir,
                out_dir / name,
                kind=kind,
                batch_size=batch_size,
                limit=limit,
                report=False,
            )
            again = score(path, res.predictions_path, kind=kind, limit=limit)
            if json.dumps(again, sort_keys=True, default=str) != json.dumps(
                res.metrics, sort_keys=True, default=str
            ):
                raise RuntimeError(
                    f"{name}: re-scoring {res.predictions_path} does not reproduce metrics.json"
                )
            results[name] = {**res.metrics, "_predictions": str(res.predictions_path), "_bench": str(path)}
    return results


# Video-MME holds the held-out split's 4-option MCQs and Video-MME-v2 its 8-option ones; LongVideoBench asks the
# same 4-option questions again (another prompt), so it is left out of the pool to count each question once.
POOLED_MCQ_KINDS = ("videomme", "videomme_v2")


def pooled_mcq_significance(
    results: dict[str, dict[str, Any]], kinds: tuple[str, ...] = POOLED_MCQ_KINDS
) -> dict[str, Any]:
    """keye.eval.metrics.mcq_significance over the distinct held-out MCQs of an eval's results ({name: metrics
    with `_bench` and `_predictions`}, as run_benchmarks returns them), read back from the predictions files."""
    predicted: list[str | None] = []
    answers: list[str] = []
    n_options: list[int] = []
    for m in results.values():
        if m.get("kind") not in kinds:
            continue
        bench = read_benchmark(m["_bench"], None, kind=m["kind"])
        rows = {}
        for line in Path(m["_predictions"]).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[str(row["id"])] = row
        for q in bench.questions:
            if q.id in rows:  # an eval limit keeps the first questions only
                predicted.append(rows[q.id].get("parsed"))
                answers.append(q.answer or "")
                n_options.append(len(q.options))
    return mcq_significance(predicted, answers, n_options)
