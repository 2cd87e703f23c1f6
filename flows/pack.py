"""Pack flow: tokenizer (trained on the run's corpus or loaded), task samples, best-fit packing to the budget."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import pack as stage
from keye.stages.artifact import ParentRun, open_stage


@task(retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)  # the PackSet id is the cache (lineage)
def pack_samples(plan: stage.PackPlan):
    return stage.pack(plan)


@flow(name="pack")
def pack(config: PipelineConfig, shardset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the PackSet id (its index is <workspace>/packs/<id>/packs.parquet)."""
    with open_stage(config, "pack", parent, flow_run.id) as run:
        plan = stage.plan(run, shardset_id)
        if plan.build:
            stage.record(run, plan, pack_samples(plan))
        return publish_stage(run, stage.finish(run, plan))
