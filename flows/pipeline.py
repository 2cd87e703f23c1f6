"""The pipeline flow: validate pipelines.yaml, run each configured stage in order under one parent run."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_pipeline
from flows.runners import task_runner
from flows.steps import STEPS
from keye.core.config import load_config
from keye.stages.artifact import open_pipeline


@flow(name="pipeline")
def pipeline(
    config_path: str = "pipelines.yaml",
    workspace: str | None = None,
    stages: list[str] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict:
    """Finished stages are skipped (key: inputs + settings + code); a left-out stage's output: the newest one."""
    listed = {"stages": list(stages)} if stages else {}
    config = load_config(config_path, overrides={**(overrides or {}), **listed}, workspace=workspace)
    with open_pipeline(config, flow_run.id, origin=str(config_path)) as ctx:
        out, runner = {}, task_runner(config.runner)
        for _, stage_flow, output, reads in (s for s in STEPS if s[0] in config.stages):
            out[output] = stage_flow.with_options(task_runner=runner)(config, *map(out.get, reads), ctx.ref)
        return publish_pipeline(ctx, ctx.finish(out))
