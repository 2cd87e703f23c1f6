"""Two checkpoints on the same held-out questions, question by question: did post-training (RL) improve what it
claims, and what did it cost elsewhere?

Paired tests, because both runs answer the same questions: for grounding, the per-query IoU difference with a
one-sided sign-flip permutation test (exact below 2^20 sign patterns, else 200k seeded draws) and the exact sign
test; for the pooled multiple-choice questions, the accuracy difference with McNemar's exact two-sided test. Every
difference carries a seeded 95% bootstrap interval, so the same predictions always give the same numbers.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keye.eval.heldout import POOLED_MCQ_KINDS, pooled_mcq_rows
from keye.eval.metrics import at_least_k_probability

_EXACT_MAX = 20  # nonzero differences up to which every sign pattern is enumerated
_DRAWS = 200_000
_BOOT = 10_000


def _bootstrap_ci(diffs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if diffs.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(_BOOT, diffs.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def sign_flip_p(diffs: Sequence[float], seed: int = 0) -> float:
    """One-sided p of mean(diffs) > 0 under the null that each difference's sign is a fair coin."""
    d = np.asarray([x for x in diffs if x != 0], dtype=np.float64)
    if d.size == 0:
        return 1.0
    observed = d.sum()
    if d.size <= _EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        sums = signs @ d
        return float(np.mean(sums >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    hits = 0
    for a in range(0, _DRAWS, 20_000):
        signs = rng.choice((1.0, -1.0), size=(min(20_000, _DRAWS - a), d.size))
        hits += int(((signs @ d) >= observed - 1e-12).sum())
    return (hits + 1) / (_DRAWS + 1)


def paired_difference(new: Sequence[float], base: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Mean of new - base over paired items with its bootstrap 95% interval, the sign-flip p (new > base) and the
    exact sign test on the items that changed."""
    a, b = np.asarray(new, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired runs differ in length: {a.size} vs {b.size}")
    d = a - b
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    lo, hi = _bootstrap_ci(d, seed)
    return {
        "n": int(d.size),
        "new_mean": float(a.mean()) if a.size else 0.0,
        "base_mean": float(b.mean()) if b.size else 0.0,
        "delta": float(d.mean()) if d.size else 0.0,
        "ci95": [lo, hi],
        "better": better,
        "worse": worse,
        "p_value": sign_flip_p(d, seed),
        "sign_test_p": at_least_k_probability(better, [0.5] * (better + worse)),
    }


def mcnemar_two_sided(only_new: int, only_base: int) -> float:
    """Exact two-sided McNemar p on the discordant pairs."""
    n = only_new + only_base
    if n == 0:
        return 1.0
    k = min(only_new, only_base)
    return min(1.0, 2.0 * (1.0 - at_least_k_probability(k + 1, [0.5] * n)))


def _rows(path: str | Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[str(row["id"])] = row
    return out


def compare_results(new: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{bench: paired grounding IoU (x100, as mIoU)} for every grounding bench both evals answered, and
    "mcq_pooled": the paired pooled multiple-choice accuracy. Inputs as run_benchmarks returns them (with
    `_predictions` and `_bench`); questions are matched by id."""
    out: dict[str, Any] = {}
    for name in sorted(new.keys() & base.keys()):
        if new[name].get("kind") != "timelens":
            continue
        rn, rb = _rows(new[name]["_predictions"]), _rows(base[name]["_predictions"])
        ids = sorted(rn.keys() & rb.keys())
        res = paired_difference([100 * rn[i]["iou"] for i in ids], [100 * rb[i]["iou"] for i in ids])
        out[name] = {"metric": "mIoU", **res}
    rn = {r[0]: r[1] == r[2] for r in pooled_mcq_rows(new, POOLED_MCQ_KINDS)}
    rb = {r[0]: r[1] == r[2] for r in pooled_mcq_rows(base, POOLED_MCQ_KINDS)}
    keys = sorted(rn.keys() & rb.keys())
    if keys:
        res = paired_difference([100.0 * rn[k] for k in keys], [100.0 * rb[k] for k in keys])
        res["p_value_two_sided"] = mcnemar_two_sided(res["better"], res["worse"])
        out["mcq_pooled"] = {"metric": "accuracy", **res}
    return out


def describe(comparison: dict[str, Any]) -> list[str]:
    """Report lines: one per compared score."""
    lines = []
    for name, c in comparison.get("scores", {}).items():
        p = c.get("p_value_two_sided", c["p_value"])
        test = "McNemar two-sided" if "p_value_two_sided" in c else "paired one-sided"
        lines.append(
            f"{name} {c['metric']}: {c['base_mean']:.1f} -> {c['new_mean']:.1f} (delta {c['delta']:+.1f}, 95% CI "
            f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]; {c['better']} better, {c['worse']} worse of {c['n']}; "
            f"{test} p {p:.2g})"
        )
    return lines


def comparison_metrics(comparison: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: compare/<score>/{base,new,delta,ci_low,ci_high,p_value}."""
    out = {}
    for name, c in comparison.get("scores", {}).items():
        key = f"compare/{name}"
        out.update(
            {
                f"{key}/base": c["base_mean"],
                f"{key}/new": c["new_mean"],
                f"{key}/delta": c["delta"],
                f"{key}/ci_low": c["ci95"][0],
                f"{key}/ci_high": c["ci95"][1],
                f"{key}/p_value": c.get("p_value_two_sided", c["p_value"]),
            }
        )
    return out
