"""The per-domain table's arithmetic on hand-made rows: shares of each specialist's gain over chance, the goal,
the flat metric names and the markdown."""

from __future__ import annotations

import math

from keye.eval.domain_table import domain_table, markdown, metrics


def _row(g: float, m: float, c: float) -> dict:
    return {"grounding": g, "grounding_chance": 27.0, "grounding_n": 10, "mcq": m, "mcq_chance": 25.0,
            "caption": c, "caption_chance": 60.0}  # fmt: skip


def test_shares_over_chance_and_the_goal() -> None:
    rows = {
        "sft": _row(47.0, 35.0, 67.0),
        "specialist:grounding": _row(49.0, 34.0, 66.0),  # 22 over chance on its domain
        "specialist:caption": _row(5.0, 25.0, 70.0),  # 10 over chance
        "mopd": _row(48.0, 36.0, 69.4),  # 21 / 22 = 95.45% grounding, 9.4 / 10 = 94% caption
    }
    t = domain_table(
        rows, {"grounding": "specialist:grounding", "caption": "specialist:caption"}, "mopd", "sft"
    )
    g, c = t["checks"]["grounding"], t["checks"]["caption"]
    assert math.isclose(g["share"], 21 / 22) and g["meets_goal"]
    assert math.isclose(c["share"], 9.4 / 10) and not c["meets_goal"]
    assert math.isclose(t["over_chance"]["specialist:caption"]["grounding"], -22.0)
    flat = metrics(t)
    assert flat["table/specialist_grounding/grounding"] == 49.0 and flat["table/mopd/caption"] == 69.4
    assert flat["table/grounding/meets_goal"] == 1.0 and flat["table/caption/meets_goal"] == 0.0
    md = markdown(t)
    assert "| mopd | 48.0 (27.0) | 36.0 (25.0) | 69.4 (60.0) |" in md
    assert "grounding 21.0 / 22.0 = 95% (meets 95%)" in md and "caption 9.4 / 10.0 = 94% (misses 95%)" in md


def test_a_specialist_no_better_than_chance_never_meets_the_goal() -> None:
    rows = {"sft": _row(30, 25, 60), "specialist:mcq": _row(30, 24, 60), "mopd": _row(30, 26, 60)}
    t = domain_table(rows, {"mcq": "specialist:mcq", "speech": "specialist:speech"}, "mopd", "sft")
    assert set(t["checks"]) == {"mcq"}  # an unknown domain / missing row has no column to check
    assert not t["checks"]["mcq"]["meets_goal"] and math.isnan(t["checks"]["mcq"]["share"])


def test_forgetting_against_the_sequential_baseline() -> None:
    """Forgetting: the points over chance a row is below the best of the start and the specialist on each
    specialist's domain, summed (here every specialist beats the start on its domain)."""
    rows = {
        "sft": _row(47.0, 35.0, 67.0),
        "specialist:grounding": _row(50.0, 34.0, 66.0),
        "specialist:mcq": _row(46.0, 38.0, 67.0),
        "specialist:caption": _row(5.0, 25.0, 69.0),
        "sequential": _row(49.5, 36.0, 63.0),  # 0.5 + 2.0 + 6.0 below the specialists
        "mopd": _row(49.0, 38.5, 69.5),  # 1.0 below on grounding only
    }
    spec = {d: f"specialist:{d}" for d in ("grounding", "mcq", "caption")}
    t = domain_table(rows, spec, "mopd", "sft", baselines=["sequential"])
    assert math.isclose(t["forgetting"]["sequential"], 8.5) and math.isclose(t["forgetting"]["mopd"], 1.0)
    assert t["forgets_less"] == {"sequential": True}
    flat = metrics(t)
    assert flat["table/forgetting/sequential"] == 8.5 and flat["table/forgets_less_than/sequential"] == 1.0
    assert "mopd 1.0, sequential 8.5 (less than sequential)" in markdown(t)
    worse = domain_table(
        {**rows, "mopd": _row(44.0, 33.0, 60.0)}, spec, "mopd", "sft", baselines=["sequential"]
    )
    assert worse["forgets_less"] == {"sequential": False}


def test_forgetting_counts_from_the_start_where_a_specialist_fell_below_it() -> None:
    """The pinned-kernel default run's table (rounded): the MCQ and caption specialists ended below the SFT start, so
    against the specialists alone the sequential model forgot nothing; against the best of the two it forgot 3.0
    points (0.8 MCQ + 2.2 caption) and the student 1.0 (MCQ)."""
    rows = {
        "sft": _row(46.9, 41.0, 70.0),
        "specialist:caption": _row(1.4, 23.6, 66.2),
        "specialist:grounding": _row(48.2, 41.9, 67.9),
        "specialist:mcq": _row(47.1, 40.2, 70.2),
        "sequential": _row(48.4, 40.2, 67.8),
        "mopd": _row(49.5, 40.0, 71.6),
    }
    spec = {d: f"specialist:{d}" for d in ("grounding", "mcq", "caption")}
    t = domain_table(rows, spec, "mopd", "sft", baselines=["sequential"])
    forgot = t["forgetting"]
    assert math.isclose(forgot["sequential"], 0.8 + 2.2) and math.isclose(forgot["mopd"], 1.0)
    assert t["forgets_less"] == {"sequential": True}
    best = {d: c["best_over_chance"] for d, c in t["checks"].items()}
    assert math.isclose(best["mcq"], 16.0)  # the start's, not the specialist's 15.2
    assert math.isclose(best["grounding"], 48.2 - 27.0)  # the specialist's
    text = "below the best of sft and the specialist): mopd 1.0, sequential 3.0 (less than sequential)"
    assert text in markdown(t)
