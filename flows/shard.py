"""Shard flow: encode captioned clips (cached), plan size-targeted shards, write each atomically, record it."""

from __future__ import annotations

from prefect import flow, task
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.runners import batched
from keye.core.config import PipelineConfig
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import make_id
from keye.core.progress import progress
from keye.data import sharding
from keye.data.shards import EncodeParams, plan_shards, shard_name
from keye.stages.artifact import ParentRun, open_stage


@task(retries=2, retry_delay_seconds=1)
def encode_clips(
    items: list[sharding.ShardItem], cache_dir: str, params: EncodeParams
) -> list[sharding.EncodedItem]:
    return sharding.encode_items(items, cache_dir, params)


@task(retries=2, retry_delay_seconds=1)
def write_shard(out_dir: str, name: str, group: list[sharding.EncodedItem]):
    return sharding.ensure_shard(out_dir, name, group)


@flow(name="shard")
def shard(config: PipelineConfig, captionset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the ShardSet id."""
    with open_stage(config, "shard", parent, flow_run.id) as ctx:
        captionset_id = captionset_id or ctx.lineage.latest_artifact(
            "captionset"
        )  # run alone: the newest one
        s = config.shard
        ss_id = make_id("ss", captionset_id, settings_hash(s), code_hash("flows.shard"))
        ctx.inputs.append(captionset_id)
        ctx.outputs.append(ss_id)
        out_dir = ctx.workspace.shards / ss_id
        if not ctx.cached(ss_id):
            ctx.lineage.begin_artifact(
                ss_id, "shardset", s.prefix, settings_hash(s), [captionset_id], path=str(out_dir)
            )
            items = sharding.shard_items(ctx.lineage, captionset_id)
            params = sharding.encode_params(s)
            cache = str(ctx.workspace.cache / "clips")
            ctx.summary["partial_files_removed"] = sharding.remove_partial_files(out_dir, cache, params)
            encoded: list[sharding.EncodedItem] = []
            futures = [encode_clips.submit(b, cache, params) for b in batched(items, s.batch_size)]
            with progress("shard: encoding clips", total=len(items)) as bar:
                for fut in as_completed(futures):
                    res = fut.result()
                    encoded += res
                    bar.advance(len(res))
            by_key = {e.item.key: e for e in encoded}
            plan = plan_shards([(k, e.bytes) for k, e in by_key.items()], s.target_bytes)
            names = [shard_name(s.prefix, i) for i in range(len(plan))]
            futures = {
                write_shard.submit(str(out_dir), name, [by_key[k] for k in keys]): (name, keys)
                for name, keys in zip(names, plan, strict=True)
            }
            with progress("shard: writing shards", total=len(futures)) as bar:
                for fut in as_completed(list(futures)):
                    name, keys = futures[fut]
                    info = fut.result()
                    ctx.lineage.record_shard(
                        ss_id,
                        sharding.shard_row(ss_id, name, info),
                        sharding.member_rows([by_key[k] for k in keys]),
                    )
                    bar.advance()
            ctx.lineage.complete_artifact(ss_id, members=[sharding.shard_id_for(ss_id, n) for n in names])
        rows = ctx.lineage.shards(ss_id)
        ctx.summary.update(
            shards=len(rows),
            shard_samples=sum(r["n_samples"] for r in rows),
            shard_bytes=sum(r["bytes"] for r in rows),
        )
        return ss_id
