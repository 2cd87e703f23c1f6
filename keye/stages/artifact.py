"""What every stage does around its work: lock the workspace, open lineage and the MLflow run, skip when cached.

Kept out of flows/ so it is plain Python that tests can call; flows only add Prefect tasks around keye calls.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from keye.core.config import PipelineConfig
from keye.core.lineage import Lineage
from keye.core.tracking import Tracker, make_client, pipeline_run
from keye.core.workspace import Workspace, WorkspaceLock


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


@dataclass
class StageContext:
    config: PipelineConfig
    workspace: Workspace
    lineage: Lineage
    tracker: Tracker
    run_id: str
    stage: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def cached(self, artifact_id: str) -> dict[str, Any] | None:
        """The artifact if a previous run completed it (then the stage has nothing to do)."""
        art = self.lineage.artifact(artifact_id)
        return art if art and art["status"] == "complete" else None


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


@contextmanager
def open_pipeline(config: PipelineConfig, flow_run_id: str | None = None) -> Iterator[PipelineContext]:
    ws = Workspace.at(config.workspace).ensure()
    with WorkspaceLock(ws):
        lineage = Lineage(ws)
        run_id = new_run_id("p")
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
        ) as tracker:
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
) -> Iterator[StageContext]:
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
            lineage.start_run(run_id, "stage", name, parent.run_id, flow_run_id, tracker.run_id, settings)
            ctx = StageContext(config, ws, lineage, tracker, run_id, name)
            try:
                yield ctx
            except BaseException:
                lineage.end_run(run_id, "failed", inputs=ctx.inputs)
                raise
            lineage.end_run(run_id, "completed", outputs=ctx.outputs, inputs=ctx.inputs)
            numeric = {
                k: v for k, v in ctx.summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            tracker.log_metrics(numeric)
            tracker.set_tags({"keye.lineage_ids": ",".join(ctx.outputs)[:5000]})
            tracker.log_dict(ctx.summary, f"{stage}_summary.json")


def tracker_for(run_id: str, uri: str | None, workspace: Workspace) -> Tracker:
    client = make_client(workspace, uri)
    return Tracker(client, run_id, client.get_run(run_id).info.experiment_id)
