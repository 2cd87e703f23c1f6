"""Caption flow: one caption record per clip from the configured backend; clips already captioned are skipped."""

from __future__ import annotations

from functools import partial

from prefect import flow, task
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from flows.submit import run_batches
from keye.core.config import PipelineConfig
from keye.data import captioning
from keye.stages import caption as stage
from keye.stages.artifact import ParentRun, open_stage


@task(retries=2, retry_delay_seconds=2)
def caption_clips(
    clips: list[captioning.ClipRef], backend: dict, alternatives: dict[str, list[str]]
) -> list[dict]:
    return captioning.caption_batch(clips, backend, alternatives)


@flow(name="caption")
def caption(config: PipelineConfig, videoset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the CaptionSet id."""
    with open_stage(config, "caption", parent, flow_run.id) as run:
        plan = stage.plan(run, videoset_id)
        label, record = f"caption ({plan.backend_name})", partial(stage.record, run)
        args = (plan.backend, plan.alternatives)
        run_batches(caption_clips, plan.todo, config.caption.batch_size, label, *args, on_result=record)
        return publish_stage(run, stage.finish(run, plan))
