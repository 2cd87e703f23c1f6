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

from keye.core.atomic import atomic_write_json
from keye.eval.export import write_heldout_benchmarks
from keye.eval.metrics import mcq_significance, paired_advantage, paired_difference
from keye.eval.readers import read_benchmark
from keye.eval.runner import evaluate, score


@dataclass
class BenchSet:
    """Benchmark files of one folder of videos: {kind: path}."""

    videos_dir: Path
    files: dict[str, Path]
    suffix: str = ""  # appended to each benchmark's name (e.g. timelens_probe beside the set's own timelens)


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
            name = (kind if len(sets) == 1 else f"{kind}-{i}") + bs.suffix
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


def prediction_rows(path: str | Path) -> dict[str, dict[str, Any]]:
    """{question id: its predictions.jsonl record}."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[str(row["id"])] = row
    return out


def paired_grounding(
    new: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]], kinds: tuple[str, ...] = ("timelens",)
) -> dict[str, dict[str, Any]]:
    """{bench: keye.eval.metrics.paired_difference of the per-query IoU (x100, as mIoU), new - base} for every
    grounding bench both evals answered (results as run_benchmarks returns them); queries matched by id."""
    out = {}
    for name in sorted(new.keys() & base.keys()):
        if new[name].get("kind") not in kinds:
            continue
        rn, rb = prediction_rows(new[name]["_predictions"]), prediction_rows(base[name]["_predictions"])
        ids = sorted(rn.keys() & rb.keys())
        res = paired_difference([100 * rn[i]["iou"] for i in ids], [100 * rb[i]["iou"] for i in ids])
        out[name] = {"metric": "mIoU", **res}
    return out


def pooled_mcq_rows(
    results: dict[str, dict[str, Any]], kinds: tuple[str, ...]
) -> list[tuple[str, str | None, str, int]]:
    """(question key, parsed letter, answer, options) of every distinct held-out MCQ in an eval's results."""
    rows_out = []
    for name, m in sorted(results.items()):
        if m.get("kind") not in kinds:
            continue
        bench = read_benchmark(m["_bench"], None, kind=m["kind"])
        rows = prediction_rows(m["_predictions"])
        for q in bench.questions:
            if q.id in rows:  # an eval limit keeps the first questions only
                rows_out.append((f"{name}/{q.id}", rows[q.id].get("parsed"), q.answer or "", len(q.options)))
    return rows_out


def pooled_mcq_significance(
    results: dict[str, dict[str, Any]], kinds: tuple[str, ...] = POOLED_MCQ_KINDS
) -> dict[str, Any]:
    """keye.eval.metrics.mcq_significance over the distinct held-out MCQs of an eval's results ({name: metrics
    with `_bench` and `_predictions`}, as run_benchmarks returns them), read back from the predictions files."""
    return _significance(pooled_mcq_rows(results, kinds))


def _significance(rows: list[tuple[str, str | None, str, int]]) -> dict[str, Any]:
    return mcq_significance([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def vision_control_path(report_dir: Path) -> Path:
    """Where an eval's blank-frame control lives, beside its report (blank predictions in the same folder)."""
    return Path(report_dir) / "blank_frames" / "vision_control.json"


def blank_frame_control(
    predict_fn: Any,
    sets: list[BenchSet],
    results: dict[str, dict[str, Any]],
    out_dir: Path,
    batch_size: int,
    limit: int | None,
    kinds: tuple[str, ...] = POOLED_MCQ_KINDS,
    grounding_kinds: tuple[str, ...] = ("timelens",),
) -> dict[str, Any]:
    """Answer the pooled MCQs and the grounding queries again with every frame blank (`predict_fn(questions,
    blank_frames=True)`, as keye_predict_fn offers) and compare question by question with `results` (the
    real-frame run).

    Why: beating chance is not seeing. A model can beat uniform guessing from the wording alone (each question type
    has likely answers), and ground above chance from the video's length alone (the frame stamps tell it); only the
    gap to its own blank-frame answers on the same questions is what it took from the pixels. Blank predictions and
    the comparison are written under `out_dir` (vision_control.json); grounding is compared per query on IoU
    (keye.eval.metrics.paired_difference, one-sided: real > blank)."""
    wanted = set(kinds) | set(grounding_kinds)
    blank_sets = [BenchSet(bs.videos_dir, {k: p for k, p in bs.files.items() if k in wanted}) for bs in sets]

    def blank_predict(questions: list[Any]) -> list[str]:
        return predict_fn(questions, blank_frames=True)

    blank = run_benchmarks(blank_predict, blank_sets, out_dir, batch_size, limit)
    real_rows, blank_rows = pooled_mcq_rows(results, kinds), pooled_mcq_rows(blank, kinds)
    real_right = {r[0]: r[1] == r[2] for r in real_rows}
    blank_right = {r[0]: r[1] == r[2] for r in blank_rows}
    keys = sorted(real_right.keys() & blank_right.keys())
    control = {
        "real": _significance(real_rows),
        "blank": _significance(blank_rows),
        "real_vs_blank": paired_advantage([real_right[k] for k in keys], [blank_right[k] for k in keys]),
        "grounding": paired_grounding(results, blank, grounding_kinds),
        "blank_predictions": {name: m["_predictions"] for name, m in blank.items()},
    }
    atomic_write_json(out_dir / "vision_control.json", control)
    return control


def control_metrics(control: dict[str, Any]) -> dict[str, float]:
    """The blank-frame control as flat MLflow metrics."""
    paired = control["real_vs_blank"]
    return {
        "vision/mcq_accuracy": float(control["real"]["accuracy"]),
        "vision/mcq_p_vs_chance": float(control["real"]["p_value"]),
        "vision/mcq_blank_accuracy": float(control["blank"]["accuracy"]),
        "vision/mcq_p_real_vs_blank": float(paired["p_value"]),
        **{
            f"vision/{name}_{key}": float(c[field])
            for name, c in control.get("grounding", {}).items()
            for key, field in (
                ("mIoU", "new_mean"),
                ("blank_mIoU", "base_mean"),
                ("p_real_vs_blank", "p_value"),
            )
        },
    }


def describe_control(control: dict[str, Any]) -> str:
    """One line for the report."""
    real, blank, paired = control["real"], control["blank"], control["real_vs_blank"]
    line = (
        f"{real['n']} pooled MCQs: {real['accuracy']:.1f}% with the frames (chance {real['chance']:.1f}%, "
        f"p {real['p_value']:.2g}), {blank['accuracy']:.1f}% with blank frames; right only with the frames "
        f"{paired['right_only_here']}, only blank {paired['right_only_in_control']} (sign test p "
        f"{paired['p_value']:.2g})"
    )
    for name, c in control.get("grounding", {}).items():
        line += (
            f"; {name} mIoU {c['new_mean']:.1f} with the frames, {c['base_mean']:.1f} with blank frames (delta "
            f"{c['delta']:+.1f}, 95% CI [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}], paired p {c['p_value']:.2g})"
        )
    return line
