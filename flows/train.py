"""Train flow: the recipes of pipelines.yaml in order (align -> pretrain -> multitask -> long -> sft), each its own
nested run, resuming from its own step checkpoints and starting from the previous recipe's final weights."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from keye.core.config import PipelineConfig
from keye.stages import train as stage
from keye.stages.artifact import ParentRun, open_stage


@flow(name="train")
def train(config: PipelineConfig, packset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the final checkpoint directory of the last recipe."""
    init, previous = config.train.init_checkpoint, None
    for recipe in stage.recipes(config):
        params = stage.params(config, recipe)
        with open_stage(config, "train", parent, flow_run.id, f"train:{recipe.name}", params) as run:
            plan = stage.plan(run, recipe, packset_id, init, previous)
            if plan.build:
                stage.train(run, plan)
            init, previous, packset_id = publish_stage(run, stage.finish(run, plan))
    return init
