"""Pack flow: tokenizer (trained on the run's corpus or loaded), task samples, best-fit packing to the budget."""

from __future__ import annotations

import json

from prefect import flow
from prefect.runtime import flow_run

from keye.core.config import PipelineConfig
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import make_id
from keye.data.packing import read_pack_index
from keye.data.samples import pack_shards
from keye.stages import pack as pack_stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="pack")
def pack(config: PipelineConfig, shardset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the PackSet id (its index is <workspace>/packs/<id>/packs.parquet)."""
    with open_stage(config, "pack", parent, flow_run.id) as ctx:
        shardset_id = shardset_id or ctx.lineage.latest_artifact("shardset")  # run alone: the newest one
        s = config.pack
        shards = pack_stage.shard_map(ctx.lineage, shardset_id)
        tok_id = pack_stage.tokenizer_id(shardset_id, s.tokenizer)
        tok_dir = ctx.workspace.root / "tokenizers" / tok_id
        tok = pack_stage.ensure_tokenizer(s.tokenizer, shards, tok_dir)
        if not ctx.cached(tok_id):
            ctx.lineage.begin_artifact(
                tok_id, "tokenizer", tok.source, settings_hash(s.tokenizer), [shardset_id], path=str(tok_dir)
            )
            ctx.lineage.complete_artifact(tok_id, sha256=tok.content_hash(), meta={"vocab_size": len(tok)})
        key = settings_hash(s, config.sampling.model_dump(mode="json"))
        ps_id = make_id(
            "ps",
            shardset_id,
            tok.content_hash(),
            key,
            code_hash("flows.pack"),
        )
        ctx.inputs += [shardset_id, tok_id]
        ctx.outputs.append(ps_id)
        out_dir = ctx.workspace.packs / ps_id
        if not ctx.cached(ps_id):
            ctx.lineage.begin_artifact(
                ps_id, "packset", "packs", key, [shardset_id, tok_id], path=str(out_dir)
            )
            result = pack_shards(
                shards,
                tok,
                config.sampling,
                pack_stage.budget(s),
                out_dir,
                tasks=s.tasks,
                seed=s.seed,
                split="train",
                mcq_orders=s.mcq_orders,
                mcq_answer=s.mcq_answer,
                mcq_turns=s.mcq_turns,
            )
            pack_ids = pack_stage.record_packs(
                ctx.lineage, ps_id, shardset_id, shards, read_pack_index(result.index_path), s.max_tokens
            )
            stats = {k: v for k, v in result.stats.items() if not isinstance(v, dict | list)}
            ctx.lineage.complete_artifact(
                ps_id,
                members=pack_ids,
                meta={
                    **stats,
                    "tokenizer_dir": str(tok_dir),
                    "bad_records": [list(b) for b in result.bad_records],
                },
            )
            ctx.tracker.log_dict(result.stats, "pack_stats.json")
        meta = json.loads(ctx.lineage.artifact(ps_id)["meta"])
        ctx.summary.update({k: v for k, v in meta.items() if isinstance(v, int | float)})
        return ps_id
