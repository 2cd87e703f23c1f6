"""The stage protocol: what every stage does around its work.

Lock the workspace, open the lineage run and the nested MLflow run (`open_stage`), name the output by a cache key
(input ids + settings + the code the stage imports, computed: `StageRun.key`), skip it when a previous run completed
it or begin / resume it (`StageRun.produce`), and record inputs, outputs and the summary when the stage ends.
A stage run alone takes the newest complete input of the kind it needs (`StageRun.input`), in this one place.
Kept out of flows/ so it is plain Python that tests can call; flows only add Prefect tasks around stage calls.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from keye.core.config import STAGE_ORDER, PipelineConfig
from keye.core.config_paths import check_paths
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import Lineage, make_id
from keye.core.tracking import CACHED_TAG, Tracker, make_client, pipeline_run
from keye.core.workspace import Workspace, WorkspaceLock
from keye.stages.crash_recovery import own_run, recover_after_crash
from keye.stages.datasets import stage_datasets


def configure_environment(workspace: Workspace) -> None:
    """Process-wide settings that must be in place before Prefect is imported (workspace-local, offline-safe)."""
    workspace.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(workspace.prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(workspace.prefect_home / "results"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def new_run_id(prefix: str) -> str:
    return f"{prefix}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


STAGES = STAGE_ORDER  # the pipeline stages, in order (keye.core.config)
_FLOW_FILE = {"eval": "evaluate"}  # flows/<file>.py of a stage, where the name differs


def stage_modules(stage: str) -> tuple[str, str]:
    """The modules whose transitive imports make a stage's code hash: keye/stages/<stage>.py and its flow."""
    stage = stage.partition(":")[0]  # "train:sft" -> "train"
    return f"keye.stages.{stage}", f"flows.{_FLOW_FILE.get(stage, stage)}"


def stage_code_hash(stage: str) -> str:
    """Hash of every keye/flows module the stage imports, transitively (keye.core.hashing.code_hash)."""
    return code_hash(*stage_modules(stage))


SYSTEM_METRICS_STAGES = ("train", "eval")  # the stages whose CPU/GPU/memory use is worth a chart


@dataclass
class StageRun:
    """One run of one stage: its lineage run id, the artifacts it read and wrote, and a summary for MLflow."""

    config: PipelineConfig
    workspace: Workspace
    lineage: Lineage
    tracker: Tracker
    run_id: str
    stage: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now().replace(microsecond=0))
    _fresh: bool = False

    def input(self, kind: str, given: str | None) -> str:
        """The given input artifact, or (a stage run on its own) the newest complete one of that kind."""
        return given or self.lineage.latest_artifact(kind)

    def key(self, prefix: str, *parts: Any) -> str:
        """An output's id: its inputs and settings (parts) plus the stage's code hash, so it cannot go stale."""
        return make_id(prefix, *parts, stage_code_hash(self.stage))

    def cached(self, artifact_id: str) -> dict[str, Any] | None:
        """The artifact if a previous run completed it (then the stage has nothing to do)."""
        art = self.lineage.artifact(artifact_id)
        return art if art and art["status"] == "complete" else None

    def produce(
        self,
        artifact_id: str,
        kind: str,
        name: str,
        settings: Any,
        inputs: list[str],
        path: str | None = None,
        output: bool = True,
    ) -> bool:
        """Declare an artifact this run makes; True when it still has to be made (begun, or resumed after a
        crash: `begin_artifact` is idempotent), False when a previous run completed it."""
        if output:
            self.inputs += [i for i in inputs if i not in self.inputs]
            self.outputs.append(artifact_id)
        if self.cached(artifact_id):
            return False
        key = settings if isinstance(settings, str) else settings_hash(settings)
        self.lineage.begin_artifact(artifact_id, kind, name, key, inputs, path=path)
        return True

    def meta(self, artifact_id: str) -> dict[str, Any]:
        """The JSON meta a completed artifact carries (counts, paths)."""
        return json.loads(self.lineage.artifact(artifact_id)["meta"] or "{}")

    def numbers(self, values: dict[str, Any]) -> None:
        """Add the numeric values to the summary (what MLflow gets as the stage's metrics)."""
        self.summary.update({k: v for k, v in values.items() if isinstance(v, int | float)})

    def reused(self) -> bool:
        """True when every output of this stage was completed by an earlier run: the stage was skipped, so its
        MLflow run is tagged cached and logs no metrics (they belong to the run that made the outputs)."""
        if self._fresh or not self.outputs:
            return False
        ids = sorted(set(self.outputs))
        rows = self.lineage.completion_of(ids)
        if any(r["status"] != "complete" or r["ts"] is None or r["ts"] >= self.started for r in rows):
            self._fresh = True  # made (or being made) by this run: stays fresh
            return False
        return {r["id"] for r in rows} >= set(ids)

    def producer_run(self) -> str | None:
        """The MLflow run of the stage run that produced this stage's first output (for a cached stage)."""
        return self.lineage.producer_mlflow_run(self.outputs[0], other_than=self.run_id)


class ParentRun(BaseModel):
    """What a stage flow needs to nest under its pipeline run (plain ids: Prefect stores flow parameters as JSON)."""

    run_id: str
    mlflow_run_id: str


@dataclass
class PipelineContext:
    config: PipelineConfig
    workspace: Workspace
    lineage: Lineage
    tracker: Tracker
    run_id: str

    @property
    def ref(self) -> ParentRun:
        return ParentRun(run_id=self.run_id, mlflow_run_id=self.tracker.run_id)

    def finish(self, outputs: dict[str, str]) -> dict[str, Any]:
        """The end-of-run summary of the artifacts the stages made (also logged to the parent MLflow run)."""
        from keye.stages.summary import pipeline_summary

        summary = pipeline_summary(self.lineage, outputs)
        self.tracker.log_dict(summary, "pipeline_summary.json")
        return summary


@contextmanager
def open_pipeline(
    config: PipelineConfig, flow_run_id: str | None = None, origin: str | None = None
) -> Iterator[PipelineContext]:
    """The parent run of a pipeline. `origin` (the config file) asks for the config phase's path checks first,
    before the workspace, MLflow or lineage are touched (keye.core.config_paths)."""
    if origin is not None:
        check_paths(config, origin=origin)
    ws = Workspace.at(config.workspace).ensure()
    with WorkspaceLock(ws):
        lineage = Lineage(ws)
        run_id = new_run_id("p")
        recover_after_crash(ws, lineage, run_id, config.tracking.uri, config.tracking.experiment)
        run_name = f"{config.name}-{run_id.rsplit('-', 1)[-1]}-{time.strftime('%Y-%m-%d')}"
        tags = {
            "keye.prefect_flow_run_id": flow_run_id,
            "keye.lineage_run_id": run_id,
            "keye.workspace": ws.root,
        }
        with pipeline_run(
            ws,
            config.name,
            params=config.model_dump(mode="json"),
            tags=tags,
            uri=config.tracking.uri,
            experiment=config.tracking.experiment,
            run_name=run_name,
        ) as tracker:
            own_run(run_id)
            lineage.start_run(
                run_id,
                "pipeline",
                config.name,
                None,
                flow_run_id,
                tracker.run_id,
                config.model_dump(mode="json"),
            )
            try:
                yield PipelineContext(config, ws, lineage, tracker, run_id)
            except BaseException:
                lineage.end_run(run_id, "failed")
                raise
            lineage.end_run(run_id, "completed")


@contextmanager
def open_stage(
    config: PipelineConfig,
    stage: str,
    parent: ParentRun | None = None,
    flow_run_id: str | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
) -> Iterator[StageRun]:
    """A stage run: nested under the pipeline's MLflow run (or a standalone parent when run alone).

    `name`/`params` default to the stage and its settings; training names each recipe (`train:sft`).
    """
    ws = Workspace.at(config.workspace).ensure()
    with WorkspaceLock(ws):
        if parent is None:
            with open_pipeline(
                config.model_copy(update={"name": f"{config.name}:{stage}"}), flow_run_id
            ) as p:
                with open_stage(config, stage, p.ref, flow_run_id, name, params) as ctx:
                    yield ctx
            return
        lineage = Lineage(ws)
        parent_tracker = tracker_for(parent.mlflow_run_id, config.tracking.uri, ws)
        settings = params if params is not None else config.stage_settings(stage).model_dump(mode="json")
        name = name or stage
        run_id = new_run_id("r")
        tags = {"keye.prefect_flow_run_id": flow_run_id, "keye.lineage_run_id": run_id}
        with parent_tracker.stage(name, params=settings, tags=tags) as tracker:
            own_run(run_id)
            lineage.start_run(run_id, "stage", name, parent.run_id, flow_run_id, tracker.run_id, settings)
            ctx = StageRun(config, ws, lineage, tracker, run_id, name)
            tracker.mute = ctx.reused  # a skipped stage logs no metrics
            try:
                with ExitStack() as stack:
                    if stage in SYSTEM_METRICS_STAGES:
                        stack.enter_context(tracker.system_metrics())
                    yield ctx
            except BaseException:
                lineage.end_run(run_id, "failed", inputs=ctx.inputs)
                raise
            cached = ctx.reused()
            lineage.end_run(run_id, "completed", outputs=ctx.outputs, inputs=ctx.inputs)
            numeric = {
                k: v for k, v in ctx.summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            tracker.log_metrics(numeric)
            tracker.set_tags(
                {
                    "keye.lineage_ids": ",".join(ctx.outputs)[:5000],
                    CACHED_TAG: str(cached).lower(),
                    "keye.cached_from": ctx.producer_run() if cached else None,
                }
            )
            if cached:
                tracker.client.update_run(tracker.run_id, name=f"{name} (cached)")
            tracker.log_datasets(stage_datasets(lineage, ws, stage, ctx.inputs, ctx.outputs))
            tracker.log_dict(ctx.summary, f"{stage}_summary.json")


def tracker_for(run_id: str, uri: str | None, workspace: Workspace) -> Tracker:
    client = make_client(workspace, uri)
    return Tracker(client, run_id, client.get_run(run_id).info.experiment_id)
