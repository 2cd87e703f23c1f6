"""Benchmark metrics as the benchmarks' own scripts define them, plus chance baselines. All scores in percent.

- TimeLens (evaluation in the TimeLens repo / VLMEvalKit port): IoU = overlap / (max end - min start), 0 when
  the predicted start >= end; R1@m = share of queries with IoU >= m; mIoU = mean IoU.
- Video-MME / LongVideoBench: accuracy over all questions (unparsable = wrong). The Video-MME script divides
  by the questions it could parse; that figure is kept as `accuracy_answered`.
- Video-MME-v2 (MME-Benchmarks/Video-MME-v2 evaluation/test_video_mme_v2.py, cal_relevance / cal_logic):
  relevance groups score 0 / 6.25 / 25 / 56.25 / 100 for 0-4 correct; logic groups score the length of the
  chain of correct answers from the first question, on a map that depends on the group's structure; the
  Non-Lin score is the mean over groups. One deliberate difference: the official script stores an unparsable
  answer as -1, which its logic chain treats as correct and its relevance sum as minus one; here it is wrong.
- Paired tests of two runs on the same questions (RL vs SFT, real vs blank frames): sign-flip permutation p,
  exact sign test, seeded bootstrap interval, McNemar (keye.eval.compare reports them).
"""

from __future__ import annotations

import ast
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

RECALL_THRESHOLDS = (0.3, 0.5, 0.7)

# Score maps indexed by the number of questions credited (official cal_relevance / cal_logic).
_QUADRATIC = (0.0, 100.0 / 16, 100.0 * 4 / 16, 100.0 * 9 / 16, 100.0)
_LOGIC_MAPS = {
    "[1, 2, 3, 4]": _QUADRATIC,
    "[1, [2, 3], 4]": (0.0, 100.0 / 12, 100.0 * 4 / 12, 100.0 * 7 / 12, 100.0),
    "[[1, 2], 3, 4]": (0.0, 100.0 / 10, 100.0 * 2 / 10, 100.0 * 5 / 10, 100.0),
}


def temporal_iou(pred: tuple[float, float] | None, gt: tuple[float, float]) -> float:
    """TimeLens IoU of a predicted span against the ground truth; an unparsable or empty/reversed
    prediction scores 0."""
    if pred is None or pred[0] >= pred[1]:
        return 0.0
    hull = max(pred[1], gt[1]) - min(pred[0], gt[0])
    if hull <= 0:
        return 0.0
    return max(min(pred[1], gt[1]) - max(pred[0], gt[0]), 0.0) / hull


def grounding_scores(ious: Sequence[float]) -> dict[str, float]:
    """R1@0.3/0.5/0.7 and mIoU (percent) over the given per-query IoUs."""
    arr = np.asarray(ious, dtype=np.float64)
    if arr.size == 0:
        return {**{f"R1@{t}": 0.0 for t in RECALL_THRESHOLDS}, "mIoU": 0.0}
    out = {f"R1@{t}": float(100.0 * np.mean(arr >= t)) for t in RECALL_THRESHOLDS}
    out["mIoU"] = float(100.0 * arr.mean())
    return out


def random_span_ious(
    gt: tuple[float, float], duration: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """IoUs of `n` spans whose two ends are drawn uniformly over [0, duration] (then sorted)."""
    return _random_span_ious(
        np.array([gt], dtype=np.float64), np.array([duration], dtype=np.float64), n, rng
    )[0]


def _random_span_ious(gts: np.ndarray, durations: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    u = rng.uniform(0.0, 1.0, size=(2, len(gts), n)) * durations[None, :, None]
    s, e = np.minimum(u[0], u[1]), np.maximum(u[0], u[1])
    g0, g1 = gts[:, :1], gts[:, 1:]
    inter = np.clip(np.minimum(e, g1) - np.maximum(s, g0), 0.0, None)
    hull = np.maximum(e, g1) - np.minimum(s, g0)
    return np.where((e > s) & (hull > 0), inter / np.where(hull > 0, hull, 1.0), 0.0)


def grounding_chance_per_query(
    items: Iterable[tuple[tuple[float, float], float]], samples: int = 1000, seed: int = 0
) -> np.ndarray:
    """Per query, the expected [R1@0.3, R1@0.5, R1@0.7, mIoU] (percent) of a guesser answering a uniformly
    random span, from a fixed-seed simulation of `samples` spans (reproducible). `items` = (gt span, duration)."""
    pairs = list(items)
    out = np.zeros((len(pairs), len(RECALL_THRESHOLDS) + 1))
    if not pairs:
        return out
    gts = np.array([gt for gt, _ in pairs], dtype=np.float64)
    durations = np.array([d for _, d in pairs], dtype=np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // samples)
    for i in range(0, len(pairs), chunk):
        ious = _random_span_ious(gts[i : i + chunk], durations[i : i + chunk], samples, rng)
        for j, t in enumerate(RECALL_THRESHOLDS):
            out[i : i + chunk, j] = 100.0 * (ious >= t).mean(axis=1)
        out[i : i + chunk, -1] = 100.0 * ious.mean(axis=1)
    return out


def grounding_chance(
    items: Iterable[tuple[tuple[float, float], float]], samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Chance R1@m and mIoU (percent) of the random-span guesser over the given queries."""
    per_query = grounding_chance_per_query(items, samples, seed)
    return chance_summary(per_query)


def chance_summary(per_query: np.ndarray) -> dict[str, float]:
    """Mean of per-query chance rows (grounding_chance_per_query) as {R1@m, mIoU}."""
    names = [f"R1@{t}" for t in RECALL_THRESHOLDS] + ["mIoU"]
    if len(per_query) == 0:
        return dict.fromkeys(names, 0.0)
    return {n: float(v) for n, v in zip(names, per_query.mean(axis=0), strict=True)}


def accuracy(correct: Sequence[bool]) -> float:
    return float(100.0 * np.mean(correct)) if len(correct) else 0.0


def mcq_chance(n_options: Sequence[int]) -> float:
    """Expected accuracy (percent) of uniform guessing: mean of 1/n over questions."""
    return float(100.0 * np.mean([1.0 / n for n in n_options])) if len(n_options) else 0.0


def at_least_k_probability(k: int, probs: Sequence[float]) -> float:
    """P(X >= k) where X counts successes of independent trials with the given success probabilities (exact
    Poisson-binomial; the binomial when all are equal). The one-sided p-value of k correct answers against
    guessing at those rates."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for i, p in enumerate(probs):
        dist[1 : i + 2] = dist[1 : i + 2] * (1.0 - p) + dist[: i + 1] * p
        dist[0] *= 1.0 - p
    return float(min(1.0, max(0.0, dist[max(k, 0) :].sum())))


def mcq_significance(
    predicted: Sequence[str | None], answers: Sequence[str], n_options: Sequence[int]
) -> dict[str, object]:
    """How far MCQ answers are from guessing: accuracy (percent) with n and the number correct; chance (uniform
    guessing) and the one-sided exact p-value of at least that many correct under it; every constant-letter
    answerer ("always A", "always B", ...) on the same questions, the best of them, and the p-value of the
    score against guessing at the best constant letter's rate (a conservative check: that rate is picked after
    seeing the answers)."""
    n = len(answers)
    correct = [p is not None and p == a for p, a in zip(predicted, answers, strict=True)]
    k = int(sum(correct))
    letters = "ABCDEFGH"[: max(n_options, default=0)]
    constant = {c: accuracy([a == c for a in answers]) for c in letters}
    best = max(constant, key=lambda c: (constant[c], -ord(c))) if constant else None
    best_rate = constant[best] / 100.0 if best else 0.0
    return {
        "n": n,
        "correct": k,
        "accuracy": accuracy(correct),
        "chance": mcq_chance(n_options),
        "p_value": at_least_k_probability(k, [1.0 / m for m in n_options]),
        "constant_letter": constant,
        "best_constant_letter": best,
        "best_constant_accuracy": constant[best] if best else 0.0,
        "p_value_vs_best_constant": at_least_k_probability(k, [best_rate] * n),
        "predicted_letters": {c: int(sum(p == c for p in predicted)) for c in letters},
    }


def paired_advantage(correct: Sequence[bool], control_correct: Sequence[bool]) -> dict[str, object]:
    """Does a run answer the same questions better than its control (e.g. the model with blank frames)? The exact
    one-sided sign test (McNemar's) on the discordant questions: right only here vs right only in the control."""
    if len(correct) != len(control_correct):
        raise ValueError(f"paired runs differ in length: {len(correct)} vs {len(control_correct)}")
    only = int(sum(bool(a) and not bool(b) for a, b in zip(correct, control_correct, strict=True)))
    only_control = int(sum(bool(b) and not bool(a) for a, b in zip(correct, control_correct, strict=True)))
    return {
        "n": len(correct),
        "accuracy": accuracy(correct),
        "control_accuracy": accuracy(control_correct),
        "right_only_here": only,
        "right_only_in_control": only_control,
        "p_value": at_least_k_probability(only, [0.5] * (only + only_control)),
    }


def relevance_group_score(correct: Sequence[bool]) -> float:
    """Video-MME-v2 capability-consistency group: 0/6.25/25/56.25/100 for 0-4 correct answers."""
    if len(correct) != 4:
        raise ValueError(f"a Video-MME-v2 group has 4 questions, got {len(correct)}")
    return _QUADRATIC[sum(bool(c) for c in correct)]


def logic_group_score(correct: Sequence[bool], structure: str = "[1, 2, 3, 4]") -> float:
    """Video-MME-v2 reasoning-coherence group: credit runs from question 1 until the first wrong answer.
    "[1, [2, 3], 4]": questions 2 and 3 are parallel, so 1 right, 2 wrong, 3 right still credits 2.
    "[[1, 2], 3, 4]": questions 1 and 2 are parallel, so 1 wrong, 2 right credits 1."""
    if len(correct) != 4:
        raise ValueError(f"a Video-MME-v2 group has 4 questions, got {len(correct)}")
    structure = str(ast.literal_eval(str(structure)))
    if structure not in _LOGIC_MAPS:
        raise ValueError(f"unknown Video-MME-v2 group_structure {structure!r}")
    c = [bool(x) for x in correct]
    last = -1
    for i, ok in enumerate(c):
        if not ok:
            break
        last = i
    if structure == "[1, [2, 3], 4]" and last == 0 and c[2]:
        last += 1
    elif structure == "[[1, 2], 3, 4]" and last == -1 and c[1]:
        last += 1
    return _LOGIC_MAPS[structure][last + 1]


def group_score(correct: Sequence[bool], group_type: str, structure: str | None = None) -> float:
    if group_type == "relevance":
        return relevance_group_score(correct)
    if group_type == "logic":
        return logic_group_score(correct, structure or "[1, 2, 3, 4]")
    raise ValueError(f"unknown Video-MME-v2 group_type {group_type!r}")


def group_chance(group_type: str, structure: str | None, n_options: Sequence[int]) -> float:
    """Exact expected group score under uniform guessing (all 16 right/wrong patterns enumerated)."""
    p = [1.0 / n for n in n_options]
    expected = 0.0
    for pattern in itertools.product((False, True), repeat=4):
        prob = float(np.prod([pi if hit else 1.0 - pi for pi, hit in zip(p, pattern, strict=True)]))
        expected += prob * group_score(pattern, group_type, structure)
    return expected


# ---------------------------------------------------------------- paired tests (two runs on the same questions)

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


# one-sided alpha 0.01 and 80% power: the normal quantiles of the planning formula n = ((z_a + z_b) sd / delta)^2
Z_ALPHA_01, Z_POWER_80 = 2.3263478740408408, 0.8416212335729143


def detectable_gain(sd: float, n: int) -> float:
    """The smallest true mean gain a one-sided test at p < 0.01 finds with 80% power, given the per-item SD of
    the paired differences and n items (normal approximation)."""
    return (Z_ALPHA_01 + Z_POWER_80) * sd / math.sqrt(n) if n > 0 else math.inf


def items_needed(sd: float, delta: float) -> int:
    """Paired items needed for `delta` to reach p < 0.01 with 80% power at the given per-item SD."""
    if delta == 0:
        return 0 if sd == 0 else -1  # -1: no number of items makes a zero gain significant
    return math.ceil(((Z_ALPHA_01 + Z_POWER_80) * sd / abs(delta)) ** 2)


def paired_difference(new: Sequence[float], base: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Mean of new - base over paired items with its bootstrap 95% interval, the sign-flip p (new > base), the
    exact sign test on the items that changed, and what the set can tell: the smallest gain it detects at p < 0.01
    with 80% power, and the items the observed gain would need (why: a +2 on 33 grounding queries with a per-query
    SD of 15 is noise, bench/RESULTS.md `## video_rl on 223 held-out queries`)."""
    a, b = np.asarray(new, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired runs differ in length: {a.size} vs {b.size}")
    d = a - b
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    lo, hi = _bootstrap_ci(d, seed)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
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
        "sd": sd,
        "detectable_gain": detectable_gain(sd, int(d.size)),
        "items_needed": items_needed(sd, float(d.mean()) if d.size else 0.0),
    }


def mcnemar_two_sided(only_new: int, only_base: int) -> float:
    """Exact two-sided McNemar p on the discordant pairs."""
    n = only_new + only_base
    if n == 0:
        return 1.0
    k = min(only_new, only_base)
    return min(1.0, 2.0 * (1.0 - at_least_k_probability(k + 1, [0.5] * n)))
