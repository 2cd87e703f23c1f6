"""Paired comparison of two evals (keye.eval.compare): the tests against hand-computed cases, and a comparison of
two real predictions files question by question."""

from __future__ import annotations

import json
import math

import pytest

from keye.eval.compare import compare_results, describe, mcnemar_two_sided, paired_difference, sign_flip_p
from keye.eval.metrics import detectable_gain, items_needed


def test_sign_flip_p_exact_cases():
    assert sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(1 / 8)  # only the all-plus pattern reaches the sum
    assert sign_flip_p([2.0, -1.0]) == pytest.approx(2 / 4)  # (+2,-1) and (+2,+1) reach 1
    assert sign_flip_p([0.0, 0.0]) == 1.0  # nothing changed: no evidence
    assert sign_flip_p([-1.0, -2.0]) == pytest.approx(1.0)


def test_sign_flip_p_monte_carlo_is_seeded_and_small_for_a_clear_gain():
    diffs = [1.0 + 0.1 * i for i in range(30)]  # 30 improvements: exact p is 2^-30
    p = sign_flip_p(diffs)
    assert p == sign_flip_p(diffs) and p < 1e-4
    mixed = [1.0, -1.0] * 15
    assert sign_flip_p(mixed) > 0.3


def test_paired_difference_counts_and_interval():
    res = paired_difference([3.0, 2.0, 5.0, 1.0], [1.0, 2.0, 1.0, 2.0])
    assert res["delta"] == pytest.approx(1.25)
    assert (res["better"], res["worse"], res["n"]) == (2, 1, 4)
    lo, hi = res["ci95"]
    assert lo <= res["delta"] <= hi
    assert res["sign_test_p"] == pytest.approx(0.5)  # 2 of 3 changed ones better: P(X >= 2 | 3, 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])


def test_paired_difference_says_what_the_set_can_detect():
    # diffs 2, 0, 4, -1: mean 1.25, sample SD sqrt(((0.75)^2 + 1.25^2 + 2.75^2 + 2.25^2) / 3) = sqrt(14.75 / 3)
    res = paired_difference([3.0, 2.0, 5.0, 1.0], [1.0, 2.0, 1.0, 2.0])
    sd = (14.75 / 3) ** 0.5
    assert res["sd"] == pytest.approx(sd)
    z = 2.3263478740408408 + 0.8416212335729143  # one-sided 0.01, power 0.8
    assert res["detectable_gain"] == pytest.approx(z * sd / 2.0)
    assert res["items_needed"] == math.ceil((z * sd / 1.25) ** 2) == 32
    # the session's case: SD 15 per grounding query, a +1.8 gain needs ~700 queries; 33 detect only ~8.3
    assert items_needed(15.0, 1.8) == 697 and detectable_gain(15.0, 33) == pytest.approx(8.27, abs=0.01)
    assert items_needed(0.0, 0.0) == 0 and items_needed(3.0, 0.0) == -1


def test_mcnemar_two_sided():
    assert mcnemar_two_sided(0, 0) == 1.0
    assert mcnemar_two_sided(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_two_sided(3, 3) == 1.0


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_results_pairs_grounding_queries_by_id(tmp_path):
    new = _write(tmp_path / "new.jsonl", [{"id": f"q{i}", "iou": 0.5 + 0.01 * i} for i in range(12)])
    base = _write(tmp_path / "base.jsonl", [{"id": f"q{i}", "iou": 0.2} for i in reversed(range(12))])
    out = compare_results(
        {"timelens": {"kind": "timelens", "_predictions": new}},
        {"timelens": {"kind": "timelens", "_predictions": base}},
    )
    c = out["timelens"]
    assert c["n"] == 12 and c["better"] == 12 and c["p_value"] == pytest.approx(2**-12)
    assert c["base_mean"] == pytest.approx(20.0) and c["delta"] == pytest.approx(
        35.5
    )  # 100 * (0.5 + 0.01 * 5.5) - 20
    line = describe({"scores": out})[0]
    assert line.startswith("timelens mIoU: 20.0 -> 55.5") and "12 better, 0 worse of 12" in line
