"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The only module that imports mlflow. Uses MlflowClient with explicit run ids rather than the fluent API's
thread-local "active run", so stages running in Prefect tasks, threads or other processes log to the right run.
Default store: sqlite at <workspace>/mlflow.db (MLflow 3's file store is in maintenance mode); any URI works.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.core.workspace import Workspace

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "keye.stage"
FLOW_RUN_TAG = "keye.prefect_flow_run_id"
LINEAGE_TAG = "keye.lineage_ids"
PIPELINE_TAG = "keye.pipeline"


def default_uri(workspace: Workspace) -> str:
    return f"sqlite:///{workspace.mlflow_db}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> flat `a.b.c` params (MLflow params are strings, at most 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v, default=str) if not isinstance(v, str) else v
            out[key] = s[:6000]
    return out


@dataclass
class Tracker:
    """Logs to one MLflow run; `stage()` opens a nested child run."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    _step: dict[str, int] = field(default_factory=dict)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step if step is not None else 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    @contextmanager
    def stage(
        self, name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
    ) -> Iterator[Tracker]:
        """A nested run for one stage; FAILED if the body raises, FINISHED otherwise."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={PARENT_TAG: self.run_id, STAGE_TAG: name, **{k: str(v) for k, v in (tags or {}).items()}},
        )
        child = Tracker(self.client, run.info.run_id, self.experiment_id)
        if params:
            child.log_params(params)
        with _terminate_on_exit(self.client, child.run_id):
            yield child


@contextmanager
def _terminate_on_exit(client: MlflowClient, run_id: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def make_client(workspace: Workspace, uri: str | None = None) -> MlflowClient:
    uri = uri or os.environ.get("KEYE_MLFLOW_URI") or default_uri(workspace)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str, workspace: Workspace) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = workspace.mlflow_artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=artifacts.as_uri())
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def pipeline_run(
    workspace: Workspace,
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
    experiment: str = "keye",
) -> Iterator[Tracker]:
    """The parent run of one pipeline run."""
    client = make_client(workspace, uri)
    exp_id = experiment_id(client, experiment, workspace)
    run = client.create_run(
        exp_id, run_name=name, tags={PIPELINE_TAG: name, **{k: str(v) for k, v in (tags or {}).items()}}
    )
    tracker = Tracker(client, run.info.run_id, exp_id)
    if params:
        tracker.log_params(params)
    with _terminate_on_exit(client, tracker.run_id):
        yield tracker


def register_checkpoint(
    tracker: Tracker,
    checkpoint_dir: str | Path,
    name: str,
    score: float,
    alias: str = "best",
    metric: str = "score",
) -> dict[str, Any]:
    """Log a checkpoint as artifacts of the run, register it as a model version, and point `alias` at it when it
    scores higher than the version the alias holds now (MLflow 3 uses aliases, not stages)."""
    client = tracker.client
    tracker.log_artifact(checkpoint_dir, "checkpoint")
    source = f"{client.get_run(tracker.run_id).info.artifact_uri}/checkpoint"
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Keye checkpoints (safetensors + config.json)")
    mv = client.create_model_version(
        name,
        source=source,
        run_id=tracker.run_id,
        tags={metric: str(score), "keye.checkpoint": str(checkpoint_dir)},
    )
    best = None
    try:
        best = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        pass
    promoted = best is None or float(best.tags.get(metric, "-inf")) < score
    if promoted:
        client.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": int(mv.version), "alias": alias if promoted else None, "source": source}
