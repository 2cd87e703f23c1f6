"""Metrics against hand-computed cases (TimeLens IoU/R1/mIoU, MCQ, Video-MME-v2 group scoring, chance)."""

import numpy as np
import pytest

from keye.eval.metrics import (
    grounding_chance,
    grounding_scores,
    group_chance,
    logic_group_score,
    mcq_chance,
    random_span_ious,
    relevance_group_score,
    temporal_iou,
)


def test_temporal_iou_hand_cases():
    assert temporal_iou((2.0, 6.0), (4.0, 8.0)) == pytest.approx(2 / 6)
    assert temporal_iou((0.0, 10.0), (0.0, 10.0)) == 1.0
    assert temporal_iou((3.0, 4.0), (0.0, 10.0)) == pytest.approx(0.1)
    assert temporal_iou((0.0, 1.0), (2.0, 3.0)) == 0.0  # disjoint
    assert temporal_iou((5.0, 5.0), (4.0, 6.0)) == 0.0  # empty span
    assert temporal_iou((6.0, 2.0), (2.0, 6.0)) == 0.0  # reversed: TimeLens scores it 0
    assert temporal_iou(None, (2.0, 6.0)) == 0.0


def test_grounding_scores_hand_case():
    out = grounding_scores([1 / 3, 0.5, 0.8, 0.0])
    assert out["R1@0.3"] == pytest.approx(75.0)
    assert out["R1@0.5"] == pytest.approx(50.0)  # IoU exactly 0.5 counts (>=)
    assert out["R1@0.7"] == pytest.approx(25.0)
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 0.5 + 0.8) / 4)


def test_relevance_scores_follow_quadratic_map():
    assert [relevance_group_score([True] * k + [False] * (4 - k)) for k in range(5)] == [
        0.0,
        6.25,
        25.0,
        56.25,
        100.0,
    ]
    assert relevance_group_score([False, True, False, True]) == 25.0  # position does not matter


@pytest.mark.parametrize(
    "correct,structure,expected",
    [
        ([1, 1, 0, 1], "[1, 2, 3, 4]", 25.0),  # chain stops at the first wrong answer
        ([0, 1, 1, 1], "[1, 2, 3, 4]", 0.0),
        ([1, 1, 1, 1], "[1, 2, 3, 4]", 100.0),
        ([1, 1, 1, 0], "[1, 2, 3, 4]", 56.25),
        ([1, 0, 1, 1], "[1, [2, 3], 4]", 400 / 12),  # 2 and 3 parallel: 3 right stands in for 2
        ([1, 1, 0, 1], "[1, [2, 3], 4]", 400 / 12),
        ([1, 1, 1, 0], "[1, [2, 3], 4]", 700 / 12),
        ([1, 0, 0, 1], "[1, [2, 3], 4]", 100 / 12),
        ([0, 1, 1, 1], "[[1, 2], 3, 4]", 10.0),  # 1 and 2 parallel: 2 right credits one
        ([1, 0, 1, 1], "[[1, 2], 3, 4]", 10.0),
        ([1, 1, 0, 0], "[[1, 2], 3, 4]", 20.0),
        ([1, 1, 1, 0], "[[1, 2], 3, 4]", 50.0),
        ([1, 1, 1, 1], "[[1, 2], 3, 4]", 100.0),
    ],
)
def test_logic_scores(correct, structure, expected):
    assert logic_group_score([bool(c) for c in correct], structure) == pytest.approx(expected)


def test_logic_rejects_unknown_structure_and_wrong_size():
    with pytest.raises(ValueError):
        logic_group_score([True] * 4, "[1, 2, [3, 4]]")
    with pytest.raises(ValueError):
        relevance_group_score([True] * 3)


def test_group_chance_exact_enumeration():
    # p = 1/2: E = (4*6.25 + 6*25 + 4*56.25 + 100) / 16
    assert group_chance("relevance", None, [2, 2, 2, 2]) == pytest.approx(500 / 16)
    # chain of length k has probability 2^-(k+1) (k<4), 1/16 for all four
    expected = 6.25 / 4 + 25 / 8 + 56.25 / 16 + 100 / 16
    assert group_chance("logic", "[1, 2, 3, 4]", [2, 2, 2, 2]) == pytest.approx(expected)
    assert group_chance("relevance", None, [8] * 4) < 12.5  # the non-linear map punishes guessing


def test_mcq_chance():
    assert mcq_chance([4, 4, 8]) == pytest.approx(100 * (0.25 + 0.25 + 0.125) / 3)


def test_random_span_chance_matches_analytic_whole_video_case():
    # GT = the whole video: IoU = |u1 - u2| for two uniform points, mean 1/3, P(IoU >= m) = (1 - m)^2.
    ious = random_span_ious((0.0, 1.0), 1.0, 200_000, np.random.default_rng(0))
    assert ious.mean() == pytest.approx(1 / 3, abs=3e-3)
    for m in (0.3, 0.5, 0.7):
        assert np.mean(ious >= m) == pytest.approx((1 - m) ** 2, abs=3e-3)


def test_grounding_chance_is_reproducible():
    items = [((1.0, 3.0), 10.0), ((0.0, 8.0), 8.0)]
    a, b = grounding_chance(items, seed=0), grounding_chance(items, seed=0)
    assert a == b
    assert 0 < a["R1@0.7"] < a["R1@0.5"] < a["R1@0.3"] < 100


def test_at_least_k_probability_is_the_exact_binomial_tail():
    from math import comb

    from keye.eval.metrics import at_least_k_probability

    n, p = 24, 0.25
    tail = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(12, n + 1))
    assert at_least_k_probability(12, [p] * n) == pytest.approx(tail, rel=1e-12)
    assert at_least_k_probability(0, [p] * n) == pytest.approx(1.0)
    assert at_least_k_probability(n + 1, [p] * n) == 0.0
    # unequal rates (4- and 8-option questions): all three right = product of the rates
    assert at_least_k_probability(3, [0.25, 0.25, 0.125]) == pytest.approx(0.25 * 0.25 * 0.125)


def test_mcq_significance_against_chance_and_constant_letters():
    from keye.eval.metrics import mcq_significance

    answers = list("ABCDABCDBB")
    always_b = mcq_significance(["B"] * 10, answers, [4] * 10)
    assert always_b["accuracy"] == always_b["best_constant_accuracy"] == 40.0
    assert always_b["best_constant_letter"] == "B" and always_b["constant_letter"]["A"] == 20.0
    assert always_b["chance"] == 25.0 and always_b["n"] == 10 and always_b["correct"] == 4
    assert always_b["p_value_vs_best_constant"] > 0.5  # no better than its own baseline
    perfect = mcq_significance(answers, answers, [4] * 10)
    assert perfect["p_value"] == pytest.approx(0.25**10)
    assert perfect["predicted_letters"]["B"] == 4
    unparsed = mcq_significance([None] * 10, answers, [4] * 10)
    assert unparsed["correct"] == 0 and unparsed["p_value"] == 1.0


def test_paired_advantage_is_the_exact_sign_test_on_discordant_questions():
    from keye.eval.metrics import paired_advantage

    real = [True] * 7 + [False] * 3 + [True] * 2
    blank = [False] * 7 + [True] * 1 + [False] * 2 + [True] * 2
    res = paired_advantage(real, blank)
    assert (res["right_only_here"], res["right_only_in_control"], res["n"]) == (7, 1, 12)
    assert res["p_value"] == pytest.approx(9 / 256)  # P(X >= 7), X ~ Binomial(8, 1/2)
    assert res["accuracy"] == pytest.approx(100 * 9 / 12) and res["control_accuracy"] == pytest.approx(25.0)
    assert paired_advantage(blank, real)["p_value"] > 0.9
    with pytest.raises(ValueError, match="differ in length"):
        paired_advantage(real, blank[:-1])
