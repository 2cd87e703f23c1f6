"""What a run shows on its Prefect flow-run page: each stage's summary (markdown) and its counts, rejections and
scores (tables) with a link to its MLflow run; the pipeline's summary on the parent flow run; the same headline
lines in the flow-run log. Why: a run started from a deployment has no terminal, so the page is the report.

Each flow passes its result through one function here as the last line of its stage block
(`return publish_stage(run, stage.finish(run, plan))`), the pipeline flow `publish_pipeline(ctx, summary)`; the numbers come from keye (plain values), Prefect only displays them.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from keye.core.tracking import Tracker
from keye.stages.artifact import PipelineContext, StageRun
from keye.stages.summary import eval_scores, headline_metrics, render


def _key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _round(v: Any) -> Any:
    return round(v, 2) if isinstance(v, float) else v


def mlflow_link(tracker: Tracker) -> str:
    """A markdown link to the run in the MLflow UI when tracking goes through a server, else where to look."""
    uri = str(tracker.client.tracking_uri)
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        return f"[MLflow run {tracker.run_id[:8]}]({url})"
    return f"MLflow run `{tracker.run_id}` in `{uri}` (`mlflow ui --backend-store-uri {uri}`)"


def _log(lines: list[str]) -> None:
    logger = get_run_logger()
    for line in lines:
        logger.info(line)


def stage_lines(name: str, summary: dict[str, Any], cached: bool) -> list[str]:
    """The headline of a stage: its counts on one line, one line per rejection reason."""
    counts = ", ".join(
        f"{k} {_round(v)}"
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    )
    lines = [f"{name}{' (cached: outputs of an earlier run)' if cached else ''}: {counts or 'done'}"]
    lines += [f"  rejected x{n}: {reason}" for reason, n in (summary.get("rejections") or {}).items()]
    return lines


def publish_stage(ctx: StageRun, result: Any = None) -> Any:
    """Markdown summary + tables of one stage run, as artifacts of the current (stage) flow run; returns `result`."""
    cached = ctx.reused()
    lines = stage_lines(ctx.stage, ctx.summary, cached)
    _log(lines)
    link = mlflow_link(ctx.tracker)
    key = _key(ctx.stage)
    counts = [
        {"metric": k, "value": _round(v)}
        for k, v in ctx.summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    md = [f"# {ctx.stage}{' (cached)' if cached else ''}", "", link, ""]
    md += [f"- lineage run `{ctx.run_id}`; outputs: {', '.join(f'`{o}`' for o in ctx.outputs) or '-'}"]
    md += [f"- {line.strip()}" for line in lines]
    for k, v in ctx.summary.items():
        if isinstance(v, str) and k in ("report", "checkpoint_dir", "shard_dir"):
            md.append(f"- {k}: `{v}`")
    create_markdown_artifact("\n".join(md), key=_key(key, "summary"), description=f"{ctx.stage}: {link}")
    if counts:
        create_table_artifact(counts, key=_key(key, "counts"), description=f"{ctx.stage} counts; {link}")
    if rejections := ctx.summary.get("rejections"):
        create_table_artifact(
            [{"reason": r, "videos": n} for r, n in rejections.items()],
            key=_key(key, "rejections"),
            description=f"{ctx.stage}: rejected videos by reason",
        )
    if ctx.stage == "eval" and ctx.outputs:
        scores = eval_scores(ctx)
        rows = [
            {
                "benchmark": b,
                "metric": e["metric"],
                "score": _round(e["value"]),
                "chance": _round(e["chance"]),
                "below chance": isinstance(e["chance"], int | float) and e["value"] < e["chance"],
                "questions": e["n"],
            }
            for b, e in scores.items()
        ]
        if rows:
            create_table_artifact(rows, key="eval-scores", description=f"held-out scores vs chance; {link}")
    return result


def publish_pipeline(ctx: PipelineContext, summary: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's headline metrics on its MLflow parent run; its summary as the parent flow run's artifact;
    returns the summary."""
    metrics = headline_metrics(summary)
    ctx.tracker.log_metrics(metrics)
    text = render(summary)
    _log(text.splitlines())
    link = mlflow_link(ctx.tracker)
    create_markdown_artifact(
        f"# pipeline `{ctx.config.name}`\n\n{link}\n\n```\n{text}\n```\n",
        key="pipeline-summary",
        description=f"run summary; {link}",
    )
    if metrics:
        create_table_artifact(
            [{"metric": k, "value": _round(v)} for k, v in metrics.items()],
            key="pipeline-headline",
            description=f"headline metrics (also on the MLflow parent run); {link}",
        )
    return summary
