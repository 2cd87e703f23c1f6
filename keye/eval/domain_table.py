"""The per-domain held-out table of a distillation (issue 18): the start checkpoint, each domain's specialist and the
student, scored on the same held-out videos (grounding mIoU, MCQ accuracy, caption word F1), each over its chance,
with the student's share of every specialist's gain over chance on the specialist's own domain.

Why a table and not one score: MOPD's promise is that one student keeps every specialist's skill, and forgetting
shows only in the columns a teacher was not trained for. Chance differs by domain (a constant span, a random letter,
another video's caption), so shares are taken over chance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from keye.data.prompts import CAPTION_PROMPT
from keye.eval.heldout import BenchSet, heldout_benchmarks, prediction_rows, run_benchmarks
from keye.eval.metrics import paired_difference
from keye.rl.rewards import caption_f1

DOMAINS = ("grounding", "mcq", "caption")
SHARE_GOAL = 0.95  # the student's gain over chance / the specialist's, on the specialist's domain


def caption_scores(predict: Any, videos: Sequence[str], limit: int | None = None) -> tuple[float, float]:
    """(mean word F1 of the model's captions of the held-out videos, chance: the mean F1 of the next video's
    caption against each reference), in percent."""
    anns = {v: json.loads(Path(v).with_suffix(".json").read_text()) for v in videos}
    held = [v for v in videos if anns[v].get("split") == "heldout"][:limit]
    if not held:
        return float("nan"), float("nan")
    refs = [anns[v]["caption"] for v in held]
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": v}, {"type": "text", "text": CAPTION_PROMPT}],
            }
        ]
        for v in held
    ]
    answers = predict.chat(chats)
    score = sum(caption_f1(a, {"caption": r}) for a, r in zip(answers, refs, strict=True)) / len(refs)
    chance = sum(caption_f1(refs[(i + 1) % len(refs)], {"caption": r}) for i, r in enumerate(refs)) / len(
        refs
    )
    return 100 * score, 100 * chance


def score_domains(
    checkpoint: str,
    videos: Sequence[str],
    out_dir: Path,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
    frames_cache: Any = None,
) -> dict[str, Any]:
    """One row: every held-out grounding query (TimeLens layout), the Video-MME-layout MCQs and the captions (both
    up to `limit`), greedy, 24 new tokens. `_results` keeps run_benchmarks' output for paired tests. Rows that
    share a `frames_cache` (keye.data.frame_cache.FrameCache) decode each video once: decoding is most of the cost
    of a tiny model's answer."""
    from keye.eval.predict import keye_predict_fn

    predict = keye_predict_fn(checkpoint, device=device, max_new_tokens=24, frames_cache=frames_cache)
    sets = heldout_benchmarks(list(videos), Path(out_dir) / "benchmarks", split="heldout")
    res: dict[str, dict[str, Any]] = {}
    for kind, lim in {"timelens": None, "videomme": limit}.items():
        picked = [BenchSet(b.videos_dir, {kind: b.files[kind]}) for b in sets if kind in b.files]
        if picked:
            res.update(run_benchmarks(predict, picked, Path(out_dir), batch_size, lim))
    cap, cap_chance = caption_scores(predict, videos, limit)
    nan = float("nan")
    g, m = _pooled(res, "timelens", "mIoU"), _pooled(res, "videomme", "accuracy")
    return {
        "grounding": g.get("mIoU", nan),
        "grounding_chance": g.get("chance", {}).get("mIoU", nan),
        "grounding_n": g.get("n", 0),
        "mcq": m.get("accuracy", nan),
        "mcq_chance": m.get("chance", {}).get("accuracy", nan),
        "caption": cap,
        "caption_chance": cap_chance,
        "_results": res,
    }


def _pooled(results: Mapping[str, Mapping[str, Any]], kind: str, metric: str) -> dict[str, Any]:
    """A kind's score over every benchmark of it (videos from several folders make one benchmark each, named
    `<kind>-<i>`): the mean over all their questions, and its chance the same way."""
    parts = [m for m in results.values() if m.get("kind") == kind and m.get("n")]
    n = sum(int(m["n"]) for m in parts)
    if not n:
        return {}
    mean = sum(float(m[metric]) * int(m["n"]) for m in parts) / n
    chance = sum(float(m["chance"][metric]) * int(m["n"]) for m in parts) / n
    return {metric: mean, "chance": {metric: chance}, "n": n}


def _query_ious(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{benchmark/query id: IoU x 100} of every grounding query of a row."""
    return {
        f"{name}/{qid}": 100 * float(row["iou"])
        for name, m in results.items()
        if m.get("kind") == "timelens"
        for qid, row in prediction_rows(m["_predictions"]).items()
    }


def paired_grounding_pooled(new: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """keye.eval.metrics.paired_difference of the per-query IoU, new - base, over every grounding query both rows
    answered (all folders pooled)."""
    a, b = _query_ious(new), _query_ious(base)
    ids = sorted(a.keys() & b.keys())
    if not ids:
        return {}
    return {"metric": "mIoU", **paired_difference([a[i] for i in ids], [b[i] for i in ids])}


def domain_table(
    rows: Mapping[str, Mapping[str, Any]],
    specialists: Mapping[str, str],
    student: str,
    start: str,
    baselines: Sequence[str] = (),
) -> dict[str, Any]:
    """rows: {name: score_domains(...)}; specialists: {domain: row name of its specialist}; student / start /
    baselines (e.g. sequential training): row names. The student's share of each specialist's gain over chance on
    its domain (goal >= SHARE_GOAL); the forgetting of the student and of each baseline (the points over chance a row
    is below the best of the start and the specialist on each specialist's domain, summed; the student should forget
    less than every baseline); and the per-query paired grounding difference of every row against the start.

    Why the best of the two: forgetting is the drop from the best a model's history knew on a task (Chaudhry et al.
    2018, "Riemannian Walk", the forgetting measure), and every row here descends from the start. Against the
    specialist alone, a specialist that lost its domain's skill (an MCQ RL run that ends below the SFT) hides what a
    baseline forgot: on one CPU path the sequential model was 0.8 MCQ and 2.2 caption points below the start and
    counted 0.0."""
    table = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in rows.items()}
    over = {n: {d: r[d] - r[f"{d}_chance"] for d in DOMAINS if d in r} for n, r in table.items()}
    checks = {}
    for d, name in sorted(specialists.items()):
        if d not in DOMAINS or name not in over:
            continue
        teacher, mine = over[name][d], over[student][d]
        share = mine / teacher if teacher > 0 else float("nan")
        checks[d] = {
            "specialist": name,
            "specialist_over_chance": teacher,
            "student_over_chance": mine,
            "share": share,
            "meets_goal": bool(teacher > 0 and share >= SHARE_GOAL),
            "best_over_chance": max(teacher, over[start][d]) if d in over.get(start, {}) else teacher,
        }
    forgetting = {
        n: sum(max(0.0, c["best_over_chance"] - over[n][d]) for d, c in checks.items())
        for n in (student, *baselines)
        if n in over
    }
    forgets_less = {b: bool(forgetting[student] < forgetting[b]) for b in baselines if b in forgetting}
    base = rows[start].get("_results", {})
    vs_start = {
        n: paired_grounding_pooled(r.get("_results", {}), base) for n, r in rows.items() if n != start
    }
    return {"rows": table, "over_chance": over, "checks": checks, "grounding_vs_start": vs_start,
            "goal": SHARE_GOAL, "student": student, "start": start, "forgetting": forgetting,
            "forgets_less": forgets_less}  # fmt: skip


def metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """Flat numbers for the run summary and MLflow: `table/<row>/<domain>`, `table/<domain>/share`."""
    out: dict[str, float] = {}
    for name, row in table["rows"].items():
        key = name.replace(":", "_")
        for d in DOMAINS:
            if d in row:
                out[f"table/{key}/{d}"] = float(row[d])
    for d, c in table["checks"].items():
        out[f"table/{d}/share"] = float(c["share"])
        out[f"table/{d}/meets_goal"] = float(c["meets_goal"])
    for name, points in table.get("forgetting", {}).items():
        out[f"table/forgetting/{name.replace(':', '_')}"] = float(points)
    for name, less in table.get("forgets_less", {}).items():
        out[f"table/forgets_less_than/{name.replace(':', '_')}"] = float(less)
    return out


def markdown(table: Mapping[str, Any]) -> str:
    """The table as bench/RESULTS.md prints it."""
    lines = [
        "| checkpoint | grounding mIoU (chance) | MCQ acc (chance) | caption F1 (chance) |",
        "|---|---|---|---|",
    ]
    for name, r in table["rows"].items():
        lines.append(f"| {name} | " + " | ".join(row_text(r)) + " |")
    shares = ", ".join(share_text(d, c, table["goal"]) for d, c in table["checks"].items())
    text = "\n".join(lines) + f"\n\nStudent vs specialist, over chance: {shares}\n"
    student, forgetting = table.get("student"), table.get("forgetting", {})
    below = f"points over chance below the best of {table.get('start', 'the start')} and the specialist"
    for name, less in table.get("forgets_less", {}).items():
        text += (
            f"Forgetting ({below}): {student} {forgetting[student]:.1f}, "
            f"{name} {forgetting[name]:.1f} ({'less' if less else 'not less'} than {name})\n"
        )
    return text


def row_text(row: Mapping[str, Any]) -> list[str]:
    """Each domain's score with its chance, e.g. "48.0 (27.2)"."""
    return [f"{row[d]:.1f} ({row[f'{d}_chance']:.1f})" for d in DOMAINS]


def share_text(domain: str, check: Mapping[str, Any], goal: float) -> str:
    """e.g. "grounding 21.9 / 22.6 = 97% (meets 95%)"."""
    verdict = "meets" if check["meets_goal"] else "misses"
    return (
        f"{domain} {check['student_over_chance']:.1f} / {check['specialist_over_chance']:.1f} = "
        f"{100 * check['share']:.0f}% ({verdict} {100 * goal:.0f}%)"
    )
