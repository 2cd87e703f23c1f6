"""Specialists flow: one teacher per domain, trained from the SFT checkpoint by RL or SFT on its domain (MOPD's teachers)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import specialists as stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="specialists")
def specialists(
    config: PipelineConfig,
    checkpoint_dir: str | None = None,
    videoset_id: str | None = None,
    packset_id: str | None = None,
    parent: ParentRun | None = None,
) -> str:
    """Returns the TeacherSet id (domain -> specialist checkpoint)."""
    with open_stage(config, "specialists", parent, flow_run.id) as run:
        plan = stage.plan(run, checkpoint_dir, videoset_id, packset_id)
        if plan.build or plan.todo:
            stage.train(run, plan)
        return publish_stage(run, stage.finish(run, plan))
