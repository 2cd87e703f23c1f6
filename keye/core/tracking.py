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
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # noqa: E402

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "keye.stage"
FLOW_RUN_TAG = "keye.prefect_flow_run_id"
LINEAGE_TAG = "keye.lineage_ids"
PIPELINE_TAG = "keye.pipeline"
CACHED_TAG = "cached"  # "true" on a stage run that was skipped because its outputs were complete
# MLflow 3's UI opens an experiment on its GenAI traces view unless it is marked as model development
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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
class DatasetSpec:
    """One file a stage read, as a table (pandas), with the lineage id of the artifact it belongs to."""

    path: Path
    name: str
    lineage_id: str
    context: str  # "training" | "evaluation"
    frame: Any


@dataclass
class Tracker:
    """Logs to one MLflow run; `stage()` opens a nested child run."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    _step: dict[str, int] = field(default_factory=dict)
    mute: Any = None  # () -> bool: when true, metrics are dropped (a stage skipped because it was cached)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.mute is not None and self.mute():
            return
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

    def log_datasets(self, datasets: list[DatasetSpec]) -> None:
        """Files a run read (pack index, held-out benchmarks) as MLflow datasets, named and digested by their
        lineage id so the Dataset column and `keye lineage <id>` point at the same thing."""
        items = []
        for d in datasets:
            ds = mlflow.data.from_pandas(d.frame, source=str(d.path), name=d.name, digest=d.lineage_id[:36])
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, d.context), InputTag("keye.lineage_id", d.lineage_id)]
            items.append(DatasetInput(ds._to_mlflow_entity(), tags))
        if items:
            self.client.log_inputs(self.run_id, datasets=items)

    @contextmanager
    def system_metrics(self, interval_s: float = 5.0) -> Iterator[None]:
        """CPU, memory, disk, network (and GPU where pynvml sees one) as `system/*` metrics of this run, sampled
        every `interval_s`; a stage shorter than one interval still gets one sample at its end."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, tracking_uri=self.client.tracking_uri
        )
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            if monitor._logging_step == 0:  # no full interval elapsed: one sample now
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()

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
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag existed, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifacts = workspace.mlflow_artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(
            name, artifact_location=artifacts.as_uri(), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
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
    run_name: str | None = None,
) -> Iterator[Tracker]:
    """The parent run of one pipeline run; `name` is the config's, `run_name` what the runs table shows."""
    client = make_client(workspace, uri)
    exp_id = experiment_id(client, experiment, workspace)
    run = client.create_run(
        exp_id,
        run_name=run_name or name,
        tags={PIPELINE_TAG: name, **{k: str(v) for k, v in (tags or {}).items()}},
    )
    tracker = Tracker(client, run.info.run_id, exp_id)
    if params:
        tracker.log_params(params)
    with _terminate_on_exit(client, tracker.run_id):
        yield tracker


class KeyeChatModel(mlflow.pyfunc.PythonModel):
    """A registered checkpoint as an MLflow pyfunc model: rows of `messages` (a chat: role/content turns) and
    an optional `video` (a local file whose frames, sampled by the checkpoint's own policy, open the first user
    turn) -> the model's answer. Predictions go through keye.eval.predict, the path the benchmarks use; loading
    needs only the installed keye package (the checkpoint, tokenizer and policy travel as the model's artifact)."""

    _skip_type_hint_validation = True  # the signature is the schema (MLflow would warn about missing hints)

    def load_context(self, context: Any) -> None:
        from keye.eval.predict import keye_chat_fn

        config = context.model_config or {}
        self._chat = keye_chat_fn(
            context.artifacts["checkpoint"], max_new_tokens=int(config.get("max_new_tokens", 32))
        )

    def predict(self, context, model_input, params=None):  # no hints: the signature defines the schema
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return self._chat([chat_of(row) for row in rows])


def chat_of(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One pyfunc input row -> chat messages for keye.eval.predict (the video opens the first user turn)."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
    video = row.get("video")
    if isinstance(video, str) and video:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError("a chat with a video needs a user turn to carry its frames")
        first["content"] = [{"type": "video", "video": video}, {"type": "text", "text": first["content"]}]
    return messages


def chat_signature() -> Any:
    """Input: `messages` (list of {role, content}) and an optional `video` path; output: the answer text."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

    turn = Object([Property("role", DataType.string), Property("content", DataType.string)])
    inputs = Schema([ColSpec(Array(turn), "messages"), ColSpec(DataType.string, "video", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string)]))


def save_chat_model(checkpoint_dir: str | Path, path: str | Path, max_new_tokens: int = 32) -> Path:
    """Write the pyfunc model folder (MLmodel, signature, checkpoint artifact) for a bundled checkpoint."""
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=KeyeChatModel(),
        artifacts={"checkpoint": str(checkpoint_dir)},
        signature=chat_signature(),
        model_config={"max_new_tokens": max_new_tokens},
        pip_requirements=[],  # served with --env-manager local: the environment that has keye installed
    )
    return Path(path)


def register_checkpoint(
    tracker: Tracker,
    checkpoint_dir: str | Path,
    name: str,
    score: float,
    alias: str = "best",
    metric: str = "score",
) -> dict[str, Any]:
    """Log a checkpoint as a pyfunc model of the run (`model/`, with the checkpoint inside), register it as a
    model version, and point `alias` at it when it scores higher than the version the alias holds now (MLflow 3
    uses aliases, not stages). A checkpoint already registered from an earlier run is not registered again."""
    import tempfile

    client = tracker.client
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="Keye checkpoints as pyfunc chat models")
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("keye.checkpoint") == str(checkpoint_dir) and mv.tags.get(metric) == str(score):
            return {"name": name, "version": int(mv.version), "alias": None, "source": mv.source}
    with tempfile.TemporaryDirectory() as tmp:
        save_chat_model(checkpoint_dir, Path(tmp) / "model")
        tracker.log_artifact(Path(tmp) / "model", "model")
    source = f"{client.get_run(tracker.run_id).info.artifact_uri}/model"
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
    previous = None
    if best is not None:
        previous = {"version": int(best.version), "run_id": best.run_id, metric: best.tags.get(metric)}
    if promoted:
        client.set_registered_model_alias(name, alias, mv.version)
    return {
        "name": name,
        "version": int(mv.version),
        "alias": alias if promoted else None,
        "source": source,
        "previous_best": previous,
    }


def load_registered(uri: str) -> Any:
    """`mlflow.pyfunc.load_model` for callers that do not import mlflow (e.g. "models:/keye@best")."""
    return mlflow.pyfunc.load_model(uri)


def best_version(tracker: Tracker, name: str, alias: str = "best") -> dict[str, Any] | None:
    """The version `alias` points at now (its run's metrics included), or None: the report's "previous best"."""
    client = tracker.client
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return {"version": int(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags), "metrics": dict(metrics)}


def stage_curves(tracker: Tracker, prefix: str = "train") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per nested run of the parent whose stage tag starts with `prefix`: {run name: {metric: [(step, value)]}}
    for every metric logged at more than one step (the training curves the report draws); a cached stage's
    curves come from the run that did the work."""
    client = tracker.client
    parent = client.get_run(tracker.run_id).data.tags.get(PARENT_TAG, tracker.run_id)
    runs = client.search_runs(
        [tracker.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent}'",
        order_by=["attributes.start_time ASC"],
    )
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        if not run.data.tags.get(STAGE_TAG, "").startswith(prefix):
            continue
        source = run
        if run.data.tags.get(CACHED_TAG) == "true" and run.data.tags.get("keye.cached_from"):
            source = client.get_run(run.data.tags["keye.cached_from"])  # the run that trained it
        curves = {}
        for key in sorted(source.data.metrics):
            if key.startswith("system/"):
                continue
            history = client.get_metric_history(source.info.run_id, key)
            if len(history) > 1:
                curves[key] = [
                    (m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))
                ]
        if curves:
            out[run.info.run_name.removesuffix(" (cached)")] = curves
    return out
