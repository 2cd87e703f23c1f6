"""The pipeline flow: validate pipelines.yaml, run each configured stage in order under one parent run."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows import caption, evaluate, ingest, mopd, pack, shard, specialists, train
from flows.artifacts import publish_pipeline
from flows.runners import task_runner
from keye.core.config import load_config
from keye.stages.artifact import open_pipeline

STEPS = (  # (stage, its flow, the output it adds, the outputs it reads) in pipeline order
    ("ingest", ingest.ingest, "videoset", ()),
    ("caption", caption.caption, "captionset", ("videoset",)),
    ("shard", shard.shard, "shardset", ("captionset",)),
    ("pack", pack.pack, "packset", ("shardset",)),
    ("train", train.train, "checkpoint", ("packset",)),
    ("specialists", specialists.specialists, "teacherset", ("checkpoint", "videoset")),
    ("mopd", mopd.mopd, "checkpoint", ("checkpoint", "teacherset", "videoset")),
    ("eval", evaluate.evaluate, "eval", ("checkpoint", "videoset")),
)


@flow(name="pipeline")
def pipeline(
    config_path: str = "pipelines.yaml",
    workspace: str | None = None,
    stages: list[str] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict:
    """Finished stages are skipped (key: inputs + settings + code); a left-out stage's output: the newest one."""
    stage_list = {"stages": list(stages)} if stages else {}
    config = load_config(config_path, overrides={**(overrides or {}), **stage_list}, workspace=workspace)
    with open_pipeline(config, flow_run.id, origin=str(config_path)) as ctx:
        out: dict[str, str] = {}
        for _, stage_flow, output, reads in (s for s in STEPS if s[0] in config.stages):
            run = stage_flow.with_options(task_runner=task_runner(config.runner))
            out[output] = run(config, *[out.get(r) for r in reads], ctx.ref)
        return publish_pipeline(ctx, ctx.finish(out))
