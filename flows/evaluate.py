"""Eval flow: the held-out split as TimeLens / Video-MME / Video-MME-v2 / LongVideoBench files, answered by a
checkpoint; metrics, predictions and an HTML report go to MLflow, the checkpoint to the model registry."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import eval as stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="eval")
def evaluate(
    config: PipelineConfig,
    checkpoint_dir: str | None = None,
    videoset_id: str | None = None,
    agent_checkpoint: str | None = None,
    parent: ParentRun | None = None,
) -> str:
    """Returns the eval id; the report is <workspace>/reports/<id>/report.html (with the agent_rl branch's held-out
    agent tasks when the run made one)."""
    with open_stage(config, "eval", parent, flow_run.id) as run:
        plan = stage.plan(run, checkpoint_dir, videoset_id, agent_checkpoint)
        for (
            todo
        ) in plan.todo():  # a post-trained checkpoint's starting point first, for the paired comparison
            stage.evaluate(run, todo)
        return publish_stage(run, stage.finish(run, plan))
