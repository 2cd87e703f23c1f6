"""Agent-RL flow: agent GRPO with the frames / search / python tools on the trained checkpoint (docs/AGENT_RL.md)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import agent_rl as stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="agent_rl")
def agent_rl(
    config: PipelineConfig,
    checkpoint_dir: str | None = None,
    videoset_id: str | None = None,
    parent: ParentRun | None = None,
) -> str:
    """Returns the agent-RL checkpoint's final/ directory."""
    with open_stage(config, "agent_rl", parent, flow_run.id) as run:
        plan = stage.plan(run, checkpoint_dir, videoset_id)
        if plan.build:
            stage.train(run, plan)
        return publish_stage(run, stage.finish(run, plan))
