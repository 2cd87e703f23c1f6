"""Two checkpoints on the same held-out questions, question by question: did post-training (RL) improve what it
claims, and what did it cost elsewhere?

Paired tests, because both runs answer the same questions: for grounding, the per-query IoU difference with a
one-sided sign-flip permutation test (exact below 2^20 sign patterns, else 200k seeded draws) and the exact sign
test; for the pooled multiple-choice questions, the accuracy difference with McNemar's exact two-sided test. Every
difference carries a seeded 95% bootstrap interval, so the same predictions always give the same numbers.
"""

from __future__ import annotations

from typing import Any

from keye.eval.heldout import POOLED_MCQ_KINDS, paired_grounding, pooled_mcq_rows
from keye.eval.metrics import mcnemar_two_sided, paired_difference, sign_flip_p

__all__ = [
    "compare_results",
    "comparison_metrics",
    "describe",
    "mcnemar_two_sided",
    "paired_difference",
    "sign_flip_p",
]


def compare_results(new: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{bench: paired grounding IoU (x100, as mIoU)} for every grounding bench both evals answered, and
    "mcq_pooled": the paired pooled multiple-choice accuracy. Inputs as run_benchmarks returns them (with
    `_predictions` and `_bench`); questions are matched by id."""
    out: dict[str, Any] = paired_grounding(new, base)
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
        power = ""
        if "detectable_gain" in c and c["n"] > 1:
            need = c["items_needed"]
            power = f"; detectable at p < 0.01 with 80% power: {c['detectable_gain']:+.1f}" + (
                f", ~{need} items for 80% power at this delta" if need > c["n"] else ""
            )
        lines.append(
            f"{name} {c['metric']}: {c['base_mean']:.1f} -> {c['new_mean']:.1f} (delta {c['delta']:+.1f}, 95% CI "
            f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]; {c['better']} better, {c['worse']} worse of {c['n']}; "
            f"{test} p {p:.2g}{power})"
        )
    return lines


def comparison_metrics(comparison: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: compare/<score>/{base,new,delta,ci_low,ci_high,p_value} (+ detectable_gain, paired)."""
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
        if "detectable_gain" in c and c["n"] > 1:
            out[f"{key}/detectable_gain"] = c["detectable_gain"]
    return out
