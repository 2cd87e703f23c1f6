"""The train stage: one checkpoint per recipe of pipelines.yaml (align -> pretrain -> multitask -> long -> sft),
each resuming from its own step checkpoints and starting from the previous recipe's final weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.core.config import ConfigError, PipelineConfig
from keye.core.hashing import hash_checkpoint_dir, settings_hash
from keye.data.tokenizer import load_tokenizer
from keye.stages.artifact import StageRun
from keye.stages.pack import shard_map, task_pack_index
from keye.train import StageSettings, train_stage


@dataclass
class TrainPlan:
    checkpoint_id: str
    build: bool  # False: a previous run completed this recipe on these inputs
    recipe: StageSettings
    packset_id: str
    init: str | None  # the weights it starts from (the previous recipe's final/, or train.init_checkpoint)
    out_dir: Path


def recipes(config: PipelineConfig) -> list[StageSettings]:
    """The recipes to train in order; none is a config error (the stage would have nothing to do)."""
    if not config.train.stages:
        raise ConfigError(
            "train.stages is empty: list the recipes to train (pipelines.yaml has the default ones)"
        )
    return config.train.stages


def params(run_config: Any, recipe: StageSettings) -> dict[str, Any]:
    """What the recipe's MLflow run records as its params (the mesh as resolved for this job's world size)."""
    import os

    from keye.model.config import preset
    from keye.train.parallel import resolve_mesh

    t = run_config.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = resolve_mesh(t.parallel, world, preset(t.preset).lm.num_experts)
    return {"preset": t.preset, **recipe.model_dump(mode="json"), **mesh.as_params()}


def plan(
    run: StageRun, recipe: StageSettings, packset_id: str | None, init: str | None, previous: str | None
) -> TrainPlan:
    """`previous`: the checkpoint id of the recipe before (None for the first)."""
    packset_id = run.input("packset", packset_id)
    ckpt_id = run.key("ck", packset_id, previous or init, settings_hash(recipe), run.config.train.preset)
    out_dir = run.workspace.checkpoints / ckpt_id
    inputs = [packset_id] + ([previous] if previous else [])
    build = run.produce(ckpt_id, "training", recipe.name, recipe, inputs, path=str(out_dir))
    return TrainPlan(ckpt_id, build, recipe, packset_id, init, out_dir)


def train_on_packset(
    run: StageRun,
    recipe: StageSettings,
    packset_id: str,
    init: str | None,
    out_dir: Path,
    log_metrics: Any,
    parallel: dict[str, Any] | None = None,
    device: str | None = None,
) -> Any:
    """One recipe on a PackSet's packs (its tokenizer, shards and the pack index of the recipe's tasks): the train
    stage's recipes and the specialists stage's SFT teachers alike. Returns keye.train's TrainResult."""
    t, lineage = run.config.train, run.lineage
    tok_dir = Path(run.meta(packset_id)["tokenizer_dir"])
    tok = load_tokenizer(tok_dir)
    shards = shard_map(lineage, lineage.input_of_kind(packset_id, "shardset"))
    pack_index = task_pack_index(
        run.workspace.packs / packset_id, recipe.tasks(), shards, tok, run.config.sampling, run.config.pack
    )
    return train_stage(
        recipe,
        init_checkpoint=init,
        model_preset=t.preset,
        vocab_size=len(tok),
        image_token_id=tok.image_id,
        pack_index=pack_index,
        shards=shards,
        tokenizer_dir=tok_dir,
        policy=run.config.sampling,
        out_dir=out_dir,
        log_metrics=log_metrics,
        device=device or t.device,
        parallel=parallel,
    )


def train(run: StageRun, plan: TrainPlan) -> None:
    """Train the recipe (resuming from its step checkpoints; final/ carries the tokenizer and policy), record it."""
    import os

    lineage = run.lineage
    # several ranks (torchrun): the mesh of train.parallel (FSDP2, EP, CP, ViT apart); one process: the plain path
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = run.config.train.parallel.model_dump() if world > 1 else None
    result = train_on_packset(
        run, plan.recipe, plan.packset_id, plan.init, plan.out_dir, run.tracker.log_metrics, parallel
    )
    sha = hash_checkpoint_dir(result.checkpoint_dir)
    path = str(result.checkpoint_dir.resolve())
    cid = plan.checkpoint_id
    lineage.record_checkpoint(
        cid, path, sha, plan.recipe.name, result.steps, run.run_id, run.inputs, result.metrics
    )
    numbers = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    lineage.complete_artifact(cid, sha256=sha, meta={"steps": result.steps, **numbers})


def finish(run: StageRun, plan: TrainPlan) -> tuple[str, str, str]:
    """(final checkpoint dir, checkpoint id, PackSet id): what the next recipe starts from."""
    run.numbers(run.meta(plan.checkpoint_id))
    return str(plan.out_dir / "final"), plan.checkpoint_id, plan.packset_id
