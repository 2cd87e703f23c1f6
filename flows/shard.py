"""Shard flow: encode captioned clips (cached), plan size-targeted shards, write each atomically, record it."""

from __future__ import annotations

from functools import partial

from prefect import flow, task
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from flows.submit import run_batches, run_each
from keye.core.config import PipelineConfig
from keye.data import shard_samples
from keye.data.shards import EncodeParams
from keye.stages import shard as stage
from keye.stages.artifact import ParentRun, open_stage


@task(retries=2, retry_delay_seconds=1)
def encode_clips(items: list[shard_samples.ShardItem], cache_dir: str, params: EncodeParams) -> list:
    return shard_samples.encode_items(items, cache_dir, params)


@task(retries=2, retry_delay_seconds=1)
def write_shard(out_dir: str, name: str, group: list[shard_samples.EncodedItem]):
    return shard_samples.ensure_shard(out_dir, name, group)


@flow(name="shard")
def shard(config: PipelineConfig, captionset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the ShardSet id."""
    with open_stage(config, "shard", parent, flow_run.id) as run:
        p = stage.plan(run, captionset_id)
        args = (p.cache_dir, p.params)
        encoded = run_batches(encode_clips, p.items, config.shard.batch_size, "shard: encoding clips", *args)
        calls = [(p.out_dir, name, group) for name, group in stage.group(run, p, encoded)]
        run_each(write_shard, calls, "shard: writing shards", on_result=partial(stage.record, run, p))
        return publish_stage(run, stage.finish(run, p))
