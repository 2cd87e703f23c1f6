"""Video-RL flow: GRPO-family RL with a temporal reward and Context-RL on the SFT checkpoint (one nested run)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import video_rl as stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="video_rl")
def video_rl(
    config: PipelineConfig,
    checkpoint_dir: str | None = None,
    videoset_id: str | None = None,
    parent: ParentRun | None = None,
) -> str:
    """Returns the RL checkpoint's final/ directory."""
    with open_stage(config, "video_rl", parent, flow_run.id) as run:
        plan = stage.plan(run, checkpoint_dir, videoset_id)
        if plan.build:
            stage.train(run, plan)
        return publish_stage(run, stage.finish(run, plan))
