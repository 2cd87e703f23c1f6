"""The pipeline flow: validate pipelines.yaml, then run each configured stage in order under one parent run."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.caption import caption
from flows.evaluate import evaluate
from flows.ingest import ingest
from flows.pack import pack
from flows.runners import task_runner
from flows.shard import shard
from flows.train import train
from keye.core.config import load_config
from keye.stages.artifact import open_pipeline
from keye.stages.summary import pipeline_summary


@flow(name="pipeline")
def pipeline(
    config_path: str = "pipelines.yaml",
    workspace: str | None = None,
    stages: list[str] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict:
    """Run the stages of a pipeline config; finished stages are skipped (cache key = inputs + settings + code)."""
    if stages:
        overrides = {**(overrides or {}), "stages": list(stages)}
    config = load_config(config_path, overrides=overrides, workspace=workspace)
    runner = task_runner(config.runner)
    with open_pipeline(config, flow_run.id) as ctx:
        out: dict[str, str] = {}
        parent = ctx.ref
        if "ingest" in config.stages:
            out["videoset"] = ingest.with_options(task_runner=runner)(config, parent)
        if "caption" in config.stages:
            videoset = out.get("videoset") or ctx.lineage.latest_artifact("videoset")
            out["captionset"] = caption.with_options(task_runner=runner)(config, videoset, parent)
        if "shard" in config.stages:
            captionset = out.get("captionset") or ctx.lineage.latest_artifact("captionset")
            out["shardset"] = shard.with_options(task_runner=runner)(config, captionset, parent)
        if "pack" in config.stages:
            shardset = out.get("shardset") or ctx.lineage.latest_artifact("shardset")
            out["packset"] = pack.with_options(task_runner=runner)(config, shardset, parent)
        if "train" in config.stages:
            out["checkpoint"] = train(config, out.get("packset"), parent)
        if "eval" in config.stages:
            checkpoint = out.get("checkpoint") or ctx.lineage.latest_checkpoint_path()
            out["eval"] = evaluate(config, checkpoint, out.get("videoset"), parent)
        summary = pipeline_summary(ctx.lineage, out)
        ctx.tracker.log_dict(summary, "pipeline_summary.json")
        return summary
