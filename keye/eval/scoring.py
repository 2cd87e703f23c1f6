"""Raw answers -> per-question records and benchmark metrics: the one path used both by the eval run and by
re-scoring saved predictions, so the two always agree."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keye.eval.metrics import (
    accuracy,
    chance_summary,
    grounding_chance_per_query,
    grounding_scores,
    group_chance,
    group_score,
    mcq_chance,
    mcq_significance,
    temporal_iou,
)
from keye.eval.parsing import parse_choice, parse_span
from keye.eval.readers import Benchmark, Question

PRIMARY = {
    "timelens": "mIoU",
    "videomme": "accuracy",
    "videomme_v2": "nonlin_score",
    "longvideobench": "accuracy",
}


def score_one(q: Question, raw: str | None) -> dict[str, Any]:
    """The predictions.jsonl record of one question: its id, the raw answer and what was read from it."""
    rec: dict[str, Any] = {"id": q.id, "answer": raw if raw is not None else ""}
    if q.is_grounding:
        span = parse_span(raw) if raw else None
        rec["parsed"] = [span[0], span[1]] if span else None
        rec["iou"] = temporal_iou(span, q.spans[0])
        rec["gt"] = [q.spans[0][0], q.spans[0][1]]
    else:
        letter = parse_choice(raw, len(q.options), q.options) if raw else None
        rec["parsed"] = letter
        rec["correct"] = letter is not None and letter == q.answer
        rec["gt"] = q.answer
    rec["unparsable"] = rec["parsed"] is None
    rec["missing"] = raw is None
    if q.task:
        rec["task"] = q.task
    if q.duration_group:
        rec["duration_group"] = q.duration_group
    if q.group is not None:
        rec["group"] = q.group
    return rec


def _breakdown(
    questions: Sequence[Question], records: Sequence[dict], key: Callable[[Question], str], fn: Callable
) -> dict[str, dict[str, Any]]:
    buckets: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        k = key(q)
        if k:
            buckets[k].append(i)
    return {
        k: fn([questions[i] for i in idx], [records[i] for i in idx]) for k, idx in sorted(buckets.items())
    }


def _grounding_chance(qs: Sequence[Question]) -> np.ndarray:
    # A query without a duration is simulated over [0, its span's end].
    return grounding_chance_per_query([(q.spans[0], q.duration or max(q.spans[0][1], 1e-6)) for q in qs])


def _mcq(qs: Sequence[Question], recs: Sequence[dict]) -> dict[str, Any]:
    return {
        "n": len(qs),
        "accuracy": accuracy([r["correct"] for r in recs]),
        "chance": mcq_chance([len(q.options) for q in qs]),
    }


def _groups(
    qs: Sequence[Question], recs: Sequence[dict]
) -> list[tuple[Question, list[bool], list[Question]]]:
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(qs):
        by_group[q.group or q.id].append(i)
    out = []
    for idx in by_group.values():
        members = [qs[i] for i in idx]
        out.append((members[-1], [bool(recs[i]["correct"]) for i in idx], members))
    return out


def _v2_groups(qs: Sequence[Question], recs: Sequence[dict]) -> dict[str, Any]:
    groups = _groups(qs, recs)
    scores = [group_score(c, last.group_type or "relevance", last.group_structure) for last, c, _ in groups]
    chance = [
        group_chance(last.group_type or "relevance", last.group_structure, [len(m.options) for m in members])
        for last, _, members in groups
    ]
    return {
        "n": len(groups),
        "nonlin_score": sum(scores) / len(scores) if scores else 0.0,
        "accuracy": accuracy([r["correct"] for r in recs]),
        "chance": sum(chance) / len(chance) if chance else 0.0,
    }


def compute_metrics(bench: Benchmark, records: Sequence[dict]) -> dict[str, Any]:
    qs, kind = bench.questions, bench.kind
    primary = PRIMARY[kind]
    m: dict[str, Any] = {
        "kind": kind,
        "bench": str(Path(bench.path).resolve()),
        "primary": primary,
        "n": len(qs),
        "n_missing": sum(r["missing"] for r in records),
        "n_unparsable": sum(r["unparsable"] for r in records),
    }
    if kind == "timelens":
        m.update(grounding_scores([r["iou"] for r in records]))
        chance = _grounding_chance(qs)  # one simulation; every breakdown averages its own queries' rows
        row = {q.id: i for i, q in enumerate(qs)}
        m["chance"] = chance_summary(chance)

        def grounding(sub: Sequence[Question], recs: Sequence[dict]) -> dict[str, Any]:
            out: dict[str, Any] = {"n": len(sub), **grounding_scores([r["iou"] for r in recs])}
            out["chance"] = chance_summary(chance[[row[q.id] for q in sub]])["mIoU"]
            return out

        m["by_task"] = _breakdown(qs, records, lambda q: q.task, grounding)
        return m
    parsed = [r for r in records if not r["unparsable"]]
    m["accuracy"] = accuracy([r["correct"] for r in records])
    m["accuracy_answered"] = accuracy([r["correct"] for r in parsed])
    m["significance"] = _significance(qs, records)
    if kind == "videomme_v2":
        groups = _groups(qs, records)
        rel = [(c, last) for last, c, _ in groups if last.group_type == "relevance"]
        logic = [(c, last) for last, c, _ in groups if last.group_type == "logic"]
        summary = _v2_groups(qs, records)
        m["nonlin_score"] = summary["nonlin_score"]
        m["n_groups"] = summary["n"]
        # None (not the official script's 0.0) when a set has no groups of that type.
        m["relevance_score"] = _mean([group_score(c, "relevance") for c, _ in rel])
        m["relevance_linear_score"] = _mean([25.0 * sum(c) for c, _ in rel])
        m["logic_score"] = _mean([group_score(c, "logic", last.group_structure) for c, last in logic])
        m["chance"] = {
            "nonlin_score": summary["chance"],
            "accuracy": mcq_chance([len(q.options) for q in qs]),
        }
        # As the official script: a group is filed under its last question's level / second / third head.
        last = {q.group: q for q in qs}

        def by_group(field: Callable[[Question], Any]) -> Callable[[Question], str]:
            def key(q: Question) -> str:
                value = field(last[q.group])
                return "" if value is None or str(value) in ("", "None") else str(value)

            return key

        m["by_level"] = _breakdown(
            qs, records, by_group(lambda q: _level_name(q.extra.get("level"))), _v2_groups
        )
        m["by_task"] = _breakdown(qs, records, by_group(lambda q: q.task), _v2_groups)
        m["by_third_head"] = _breakdown(
            qs, records, by_group(lambda q: q.extra.get("third_head")), _v2_groups
        )
        return m
    m["chance"] = {"accuracy": mcq_chance([len(q.options) for q in qs])}
    m["by_duration"] = _breakdown(qs, records, lambda q: q.duration_group, _mcq)
    m["by_task"] = _breakdown(qs, records, lambda q: q.task, _mcq)
    return m


def _significance(qs: Sequence[Question], records: Sequence[dict]) -> dict[str, Any]:
    """mcq_significance over all questions, and per task (the question kind) with n, accuracy and p-values."""

    def one(sub: Sequence[Question], recs: Sequence[dict]) -> dict[str, Any]:
        return mcq_significance(
            [r["parsed"] for r in recs], [q.answer or "" for q in sub], [len(q.options) for q in sub]
        )

    out = one(qs, records)
    keep = (
        "n",
        "correct",
        "accuracy",
        "chance",
        "p_value",
        "best_constant_accuracy",
        "p_value_vs_best_constant",
    )
    out["by_task"] = {
        k: {f: v[f] for f in keep} for k, v in _breakdown(qs, records, lambda q: q.task, one).items()
    }
    return out


def _level_name(level: Any) -> str | None:
    return None if level is None or str(level) == "None" else f"level_{int(level)}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_answers(
    bench: Benchmark, answers: Mapping[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-question records for raw answers keyed by question id (a missing answer is wrong)."""
    records = [score_one(q, answers.get(q.id)) for q in bench.questions]
    return compute_metrics(bench, records), records


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics dict as 'a/b/c' -> value, names reduced to the characters MLflow accepts
    ('R1@0.5' -> 'R1_at_0.5', 'Film & TV' -> 'Film _ TV')."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = prefix + re.sub(r"[^\w.\- /:]", "_", str(k).replace("@", "_at_"))
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, Mapping):
            out.update(flat_metrics(v, key + "/"))
    return out
