"""What the MLflow runs table shows, without servers (sqlite store): the experiment kind, the parent run's name,
a stage skipped by its cache tagged cached=true with no metrics, system metrics on a training stage."""

from __future__ import annotations

import re
import time

from mlflow.tracking import MlflowClient

from keye.core.config import load_config
from keye.stages.artifact import open_pipeline, open_stage


def test_parent_name_kind_tag_cached_stage_and_system_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("KEYE_MLFLOW_URI", raising=False)
    config = load_config(None, overrides={"name": "unit"}, workspace=tmp_path / "ws")

    def one_run() -> str:
        with open_pipeline(config) as p:
            with open_stage(config, "ingest", p.ref) as ctx:
                ctx.outputs.append("vs-unit")
                if not ctx.cached("vs-unit"):
                    ctx.lineage.begin_artifact("vs-unit", "videoset", "videos", "h", [])
                    ctx.lineage.complete_artifact("vs-unit")
                ctx.summary["videos_ok"] = 3
                ctx.tracker.log_metrics({"extra": 1.0})
            with open_stage(config, "train", p.ref, name="train:sft", params={"steps": 1}) as ctx:
                ctx.tracker.log_metrics({"loss": 2.0}, step=0)
            return p.tracker.run_id

    first = one_run()
    time.sleep(1.1)  # lineage timestamps have one-second resolution
    second = one_run()
    client = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("keye")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for parent in (first, second):
        assert re.fullmatch(r"unit-[0-9a-f]{8}-\d{4}-\d{2}-\d{2}", client.get_run(parent).info.run_name)
    runs = {
        (r.data.tags["mlflow.parentRunId"], r.info.run_name): r
        for r in client.search_runs([exp.experiment_id], "tags.`keye.stage` != ''")
    }
    fresh, cached = runs[(first, "ingest")], runs[(second, "ingest (cached)")]
    assert fresh.data.tags["cached"] == "false" and fresh.data.metrics == {"videos_ok": 3.0, "extra": 1.0}
    assert cached.data.tags["cached"] == "true" and cached.data.metrics == {}
    assert cached.data.tags["keye.cached_from"] == fresh.info.run_id
    train = runs[(first, "train:sft")]
    assert train.data.metrics["loss"] == 2.0
    assert "system/cpu_utilization_percentage" in train.data.metrics  # one sample even for a short stage
    assert not any(k.startswith("system/") for k in fresh.data.metrics)  # only train and eval are sampled
