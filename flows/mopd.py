"""MOPD flow: the SFT student distilled on-policy from the teacher of each prompt's domain."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import mopd as stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="mopd")
def mopd(
    config: PipelineConfig,
    checkpoint_dir: str | None = None,
    teacherset_id: str | None = None,
    videoset_id: str | None = None,
    parent: ParentRun | None = None,
) -> str:
    """Returns the student's final checkpoint directory."""
    with open_stage(config, "mopd", parent, flow_run.id) as run:
        plan = stage.plan(run, checkpoint_dir, teacherset_id, videoset_id)
        if plan.build:
            stage.train(run, plan)
        return publish_stage(run, stage.finish(run, plan))
