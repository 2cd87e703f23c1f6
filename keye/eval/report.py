"""One HTML page per eval: a results table, per-task bars against chance and against the previous checkpoint,
IoU histograms for grounding, and a sample of the answers that went wrong. Plots are PNG files beside the
page and, by default, also embedded (base64) so the page stands alone as an MLflow artifact."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from keye.core.atomic import atomic_write_bytes, atomic_write_text

_NAMES = {
    "timelens": "TimeLens",
    "videomme": "Video-MME",
    "videomme_v2": "Video-MME-v2",
    "longvideobench": "LongVideoBench",
}
_SCALARS = {
    "timelens": ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"),
    "videomme": ("accuracy", "accuracy_answered"),
    "longvideobench": ("accuracy", "accuracy_answered"),
    "videomme_v2": ("nonlin_score", "accuracy", "relevance_score", "relevance_linear_score", "logic_score"),
}


def _chance(metrics: Mapping[str, Any], name: str) -> float | None:
    chance = metrics.get("chance")
    if isinstance(chance, Mapping):
        value = chance.get(name)
        return float(value) if isinstance(value, (int, float)) else None
    return None


class Flagged(float):
    """A score below its chance level: shown with a red mark so a reader cannot miss it."""


def _flag(score: Any, chance: Any) -> Any:
    below = (
        isinstance(score, int | float) and isinstance(chance, int | float) and float(score) < float(chance)
    )
    return Flagged(score) if below else score


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, Flagged):
        return f"<span class='below'>{float(value):.2f} ▼ below chance</span>"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    return html.escape(str(value))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _task_bars(
    kind: str, metrics: Mapping[str, Any], previous: Mapping[str, Any] | None, breakdown: str
) -> Figure | None:
    groups = metrics.get(breakdown) or {}
    if not groups:
        return None
    primary = metrics["primary"]
    names = list(groups)
    values = [float(groups[n].get(primary, 0.0)) for n in names]
    prev_groups = (previous or {}).get(breakdown) or {}
    fig = Figure(figsize=(max(5.0, 0.9 * len(names) + 2.5), 3.6))
    ax = fig.add_subplot()
    width = 0.38 if prev_groups else 0.6
    xs = list(range(len(names)))
    ax.bar(
        [x - (width / 2 if prev_groups else 0) for x in xs],
        values,
        width,
        label="this checkpoint",
        color="#3b6ea8",
    )
    if prev_groups:
        prev = [float(prev_groups.get(n, {}).get(primary, 0.0)) for n in names]
        ax.bar([x + width / 2 for x in xs], prev, width, label="previous", color="#b9c7d8", hatch="//")
    for x, n in zip(xs, names, strict=True):
        c = groups[n].get("chance")
        if isinstance(c, (int, float)):
            ax.hlines(
                c, x - 0.45, x + 0.45, colors="#c0392b", linestyles="--", label="chance" if x == 0 else None
            )
    ax.set_xticks(xs)
    ax.set_xticklabels(
        names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center"
    )
    ax.set_ylabel(f"{primary} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{_NAMES.get(kind, kind)}: {primary} by {breakdown.removeprefix('by_')}")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _iou_hist(kind: str, records: list[dict]) -> Figure | None:
    ious = [float(r["iou"]) for r in records if "iou" in r]
    if not ious:
        return None
    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.add_subplot()
    ax.hist(ious, bins=[i / 20 for i in range(21)], color="#3b6ea8", edgecolor="white")
    for t in (0.3, 0.5, 0.7):
        ax.axvline(t, color="#c0392b", linestyle="--", linewidth=0.8)
    ax.set_xlabel("IoU with the ground-truth span")
    ax.set_ylabel("queries")
    ax.set_title(f"{_NAMES.get(kind, kind)}: IoU histogram ({len(ious)} queries)")
    return fig


def _read_records(path: Path | None) -> list[dict]:
    if path is None or not Path(path).is_file():
        return []
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A table; no header row when every header cell is empty (a key/value list)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _curves_figure(run: str, curves: Mapping[str, list[tuple[int, float]]]) -> Figure | None:
    """Loss curves (left) and the learning rate (right) of one training stage run."""
    losses = {k: v for k, v in curves.items() if "loss" in k}
    lr = curves.get("lr")
    if not losses and not lr:
        return None
    fig = Figure(figsize=(9.0, 3.0))
    ax = fig.add_subplot(1, 2, 1)
    for k, pts in sorted(losses.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run}: loss")
    if losses:
        ax.legend(fontsize=7, loc="upper right")
    ax2 = fig.add_subplot(1, 2, 2)
    if lr:
        ax2.plot([p[0] for p in lr], [p[1] for p in lr], color="#c0392b", linewidth=1.2)
    ax2.set_xlabel("step")
    ax2.set_title(f"{run}: learning rate")
    fig.tight_layout()
    return fig


def _control_figure(control: Mapping[str, Any]) -> Figure:
    """Pooled held-out MCQ accuracy with the real frames vs blank frames, against chance."""
    real, blank = control["real"], control["blank"]
    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.add_subplot()
    values = [float(real["accuracy"]), float(blank["accuracy"])]
    bars = ax.bar(["real frames", "blank frames"], values, color=["#3b6ea8", "#b9c7d8"], width=0.55)
    for b, v in zip(bars, values, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}%", ha="center", fontsize=9)
    ax.axhline(float(real["chance"]), color="#c0392b", linestyle="--", label=f"chance {real['chance']:.1f}%")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    p = control["real_vs_blank"]["p_value"]
    ax.set_title(f"{real['n']} pooled MCQs: real vs blank frames (sign test p {p:.2g})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _comparison_rows(
    metrics_by_bench: Mapping[str, Mapping[str, Any]],
    best: Mapping[str, Any],
    control: Mapping[str, Any] | None,
) -> list[list[Any]]:
    """This eval's primary scores vs the run that holds the registry's `best` alias (`<bench>/<metric>`)."""
    theirs = best.get("metrics") or {}
    rows = []
    for name, m in metrics_by_bench.items():
        p = m["primary"]
        prev = theirs.get(f"{name}/{p}")
        delta = float(m[p]) - float(prev) if isinstance(prev, int | float) else None
        rows.append([_NAMES.get(m["kind"], name), p, m[p], prev, delta])
    if control:
        for key, mine in (
            ("vision/mcq_accuracy", control["real"]["accuracy"]),
            ("vision/mcq_blank_accuracy", control["blank"]["accuracy"]),
        ):
            prev = theirs.get(key)
            delta = float(mine) - float(prev) if isinstance(prev, int | float) else None
            rows.append(["pooled MCQs", key.removeprefix("vision/"), mine, prev, delta])
    return rows


def _agent_section(agent: Mapping[str, Any], max_examples: int) -> list[str]:
    """The agent tasks answered with tools by the start checkpoint, the warm-up and the agent-RL checkpoint: success,
    tool-call rate, per kind, the self-correction share, the paired sign tests, and answers that went wrong."""
    warm = agent.get("rl_over_warmup")
    named = [("start", agent["before"])]
    named += [("after the demonstration warm-up", warm["before"])] if warm else []
    named.append(("agent-RL", agent["after"]))
    kinds = sorted(
        {k.removeprefix("success_rate_") for _, r in named for k in r if k.startswith("success_rate_")}
    )
    rows = [
        [name, r.get("n_tasks"), r["success_rate"], r["tool_call_rate"]]
        + [r.get(f"success_rate_{k}") for k in kinds]
        + [r.get("self_correction_share")]
        for name, r in named
    ]
    parts = ["<h2>Agent tasks with tools (agent_rl)</h2>"]
    header = ["checkpoint", "tasks", "success", "tool-call rate", *(f"{k} success" for k in kinds)]
    parts.append(_table([*header, "self-correction"], rows))
    tests = [("agent-RL vs start", agent)] + ([("agent-RL vs its warm-up", warm)] if warm else [])
    lines = []
    for label, c in tests:
        t = c["sign_test"]
        lines.append(
            f"{label}: success {c['success_gain']:+.3f}, right only here {t['right_only_here']}, only before "
            f"{t['right_only_in_control']}, one-sided sign test p {float(t['p_value']):.2g}"
        )
    parts.append("<p>" + "<br>".join(html.escape(x) for x in lines) + "</p>")
    wrong = [r for r in (agent.get("rows") or {}).get("after", []) if not r.get("success")]
    cells = [
        [r["task_id"], r["kind"], json.dumps(r.get("calls", [])), str(r.get("answer", ""))[-200:]]
        for r in wrong
    ]
    return parts + _wrong_answers("agent answers", ["task", "kind", "calls", "answer"], cells, max_examples)


def _wrong_answers(what: str, header: list[str], cells: list[list[Any]], max_examples: int) -> list[str]:
    """The first wrong answers as a table under a heading that says how many there were."""
    if not cells:
        return []
    shown = min(max_examples, len(cells))
    return [f"<h3>{what} that went wrong (first {shown} of {len(cells)})</h3>", _table(header, cells[:shown])]


def write_report(
    metrics_by_bench: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    predictions: Mapping[str, str | Path] | None = None,
    previous: Mapping[str, Mapping[str, Any] | None] | None = None,
    notes: Mapping[str, str] | None = None,
    title: str = "Keye evaluation",
    embed: bool = True,
    max_examples: int = 12,
    curves: Mapping[str, Mapping[str, list[tuple[int, float]]]] | None = None,
    control: Mapping[str, Any] | None = None,
    best: Mapping[str, Any] | None = None,
    agent: Mapping[str, Any] | None = None,
) -> Path:
    """Write `out_dir/report.html` (+ PNG plots beside it) for one or more benchmarks' metrics (as returned by
    evaluate/score, keyed by a name such as the kind); `previous` holds an earlier checkpoint's metrics under
    the same names. Optional, all plain values: `curves` {training run: {metric: [(step, value)]}}, the
    blank-frame `control` (keye.eval.heldout.blank_frame_control), and `best` {version, metrics: {"<bench>/<metric>":
    value}} of the registered model the checkpoint is compared with (keye.core.tracking.best_version), and the
    agent_rl stage's held-out `agent` comparison (its agent_eval.json). Returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = previous or {}
    predictions = predictions or {}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(_table(["", ""], [[k, v] for k, v in notes.items()]))

    def figure(stem: str, fig: Figure) -> None:
        data = _png(fig)
        png = out_dir / f"{stem}.png"
        atomic_write_bytes(png, data)
        src = f"data:image/png;base64,{base64.b64encode(data).decode()}" if embed else png.name
        parts.append(f"<figure><img alt='{html.escape(stem)}' src='{src}'></figure>")

    summary = []
    for name, m in metrics_by_bench.items():
        p = m["primary"]
        prev = (previous.get(name) or {}).get(p)
        delta = float(m[p]) - float(prev) if isinstance(prev, (int, float)) else None
        summary.append(
            [
                _NAMES.get(m["kind"], name),
                p,
                _flag(m[p], _chance(m, p)),
                _chance(m, p),
                prev,
                delta,
                m["n"],
                m["n_unparsable"],
            ]
        )
    parts.append("<h2>Results</h2>")
    parts.append(
        _table(
            ["benchmark", "metric", "score", "chance", "previous", "Δ", "questions", "unparsable"], summary
        )
    )
    if agent:
        parts += _agent_section(agent, max_examples)
    if control:
        parts.append("<h2>What the frames add: blank-frame control</h2>")
        figure("vision_control", _control_figure(control))
    if best is not None:
        parts.append(
            f"<h2>Against the registered best (version {html.escape(str(best.get('version')))})</h2>"
        )
        parts.append(
            _table(
                ["benchmark", "metric", "this checkpoint", "best", "Δ"],
                _comparison_rows(metrics_by_bench, best, control),
            )
        )
    for run, run_curves in (curves or {}).items():
        fig = _curves_figure(run, run_curves)
        if fig is not None:
            if not any(x.startswith("<h2>Training curves") for x in parts):
                parts.append("<h2>Training curves</h2>")
            figure("curves_" + "".join(c if c.isalnum() else "_" for c in run), fig)

    for name, m in metrics_by_bench.items():
        kind = m["kind"]
        prev = previous.get(name) or None
        parts.append(
            f"<h2>{html.escape(_NAMES.get(kind, name))}</h2><p class='path'>{html.escape(str(m.get('bench', '')))}</p>"
        )
        rows = [
            [s, _flag(m.get(s), _chance(m, s)), _chance(m, s), (prev or {}).get(s)]
            for s in _SCALARS.get(kind, ())
            if s in m
        ]
        parts.append(_table(["metric", "score", "chance", "previous"], rows))
        records = _read_records(Path(predictions[name]) if name in predictions else None)
        figures = [
            (f"{name}_by_task", _task_bars(kind, m, prev, "by_task")),
            (f"{name}_by_duration", _task_bars(kind, m, prev, "by_duration")),
            (f"{name}_by_level", _task_bars(kind, m, prev, "by_level")),
            (f"{name}_iou_hist", _iou_hist(kind, records) if kind == "timelens" else None),
        ]
        for stem, fig in figures:
            if fig is not None:
                figure(stem, fig)
        for breakdown in ("by_task", "by_duration", "by_level", "by_third_head"):
            groups = m.get(breakdown) or {}
            if groups:
                p = m["primary"]
                rows = [
                    [
                        g,
                        v.get("n"),
                        _flag(v.get(p), v.get("chance")),
                        v.get("chance"),
                        ((prev or {}).get(breakdown) or {}).get(g, {}).get(p),
                    ]
                    for g, v in groups.items()
                ]
                parts.append(f"<h3>{html.escape(breakdown.removeprefix('by_'))}</h3>")
                parts.append(_table(["group", "n", p, "chance", "previous"], rows))
        wrong = [
            r for r in records if r.get("unparsable") or r.get("correct") is False or r.get("iou", 1.0) < 0.5
        ]
        cells = [[r["id"], str(r.get("answer", ""))[:200], r.get("parsed"), r.get("gt")] for r in wrong]
        parts += _wrong_answers("answers", ["id", "answer", "parsed", "expected"], cells, max_examples)
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f0f3f7}.path{color:#666}"
        "img{max-width:100%}.below{color:#c0392b;font-weight:600}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
