"""Train flow: the stage recipes of pipelines.yaml in order (align -> pretrain -> multitask -> long -> sft), each
resuming from its own step checkpoints and starting from the previous stage's final weights."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from keye.core.checkpoint_hash import hash_checkpoint_dir
from keye.core.config import PipelineConfig
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import make_id
from keye.data.tokenizer import load_tokenizer
from keye.stages.artifact import ParentRun, open_stage
from keye.stages.pack import shard_map, task_pack_index
from keye.train import train_stage
from keye.train.bundle import bundle_checkpoint


@flow(name="train")
def train(config: PipelineConfig, packset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the final checkpoint directory of the last recipe."""
    t = config.train
    init = t.init_checkpoint
    prev_id = None
    code = code_hash("flows.train")
    for recipe in t.stages:
        params = {"preset": t.preset, **recipe.model_dump(mode="json")}
        with open_stage(
            config, "train", parent, flow_run.id, name=f"train:{recipe.name}", params=params
        ) as ctx:
            packset_id = packset_id or ctx.lineage.latest_artifact("packset")
            meta = json.loads(ctx.lineage.artifact(packset_id)["meta"])
            ckpt_id = make_id("ck", packset_id, prev_id or init, settings_hash(recipe), t.preset, code)
            out_dir = ctx.workspace.checkpoints / ckpt_id
            ctx.inputs += [packset_id] + ([prev_id] if prev_id else [])
            ctx.outputs.append(ckpt_id)
            if not ctx.cached(ckpt_id):
                ctx.lineage.begin_artifact(
                    ckpt_id, "training", recipe.name, settings_hash(recipe), ctx.inputs, path=str(out_dir)
                )
                tok_dir = Path(meta["tokenizer_dir"])
                tok = load_tokenizer(tok_dir)
                shards = shard_map(ctx.lineage, ctx.lineage.input_of_kind(packset_id, "shardset"))
                pack_index = task_pack_index(
                    ctx.workspace.packs / packset_id,
                    recipe.tasks(),
                    shards,
                    tok,
                    config.sampling,
                    config.pack,
                )
                result = train_stage(
                    recipe,
                    init_checkpoint=init,
                    model_preset=t.preset,
                    vocab_size=len(tok),
                    image_token_id=tok.image_id,
                    pack_index=pack_index,
                    shards=shards,
                    tokenizer_dir=tok_dir,
                    policy=config.sampling,
                    out_dir=out_dir,
                    log_metrics=ctx.tracker.log_metrics,
                    device=t.device,
                )
                bundle_checkpoint(result.checkpoint_dir, tok_dir, config.sampling)
                sha = hash_checkpoint_dir(result.checkpoint_dir)
                ctx.lineage.record_checkpoint(
                    ckpt_id,
                    str(result.checkpoint_dir.resolve()),
                    sha,
                    recipe.name,
                    result.steps,
                    ctx.run_id,
                    ctx.inputs,
                    meta=result.metrics,
                )
                ctx.lineage.complete_artifact(
                    ckpt_id,
                    sha256=sha,
                    meta={
                        "steps": result.steps,
                        **{k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
                    },
                )
            art = ctx.lineage.artifact(ckpt_id)
            ctx.summary.update(
                {k: v for k, v in json.loads(art["meta"]).items() if isinstance(v, int | float)}
            )
            init, prev_id = str(out_dir / "final"), ckpt_id
    return init
