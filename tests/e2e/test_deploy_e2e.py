"""End to end, as a user would: `keye up`, `prefect deploy`, a run triggered through the API (what the UI's
"Run" button calls), the worker executes every stage of a tiny pipeline, the Prefect API lists each stage's
artifacts, MLflow's REST API shows the experiment kind, the parent run's name and headline metrics, system metrics
and datasets, the registered model answers through `mlflow.pyfunc.load_model`, `keye down` leaves nothing."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from keye import services

REPO = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "caption", "shard"]  # the stage deployments checked below
PIPELINE = [*STAGES, "pack", "train", "eval"]


def _tiny_config(path: Path, workspace: Path) -> Path:
    config = {
        "name": "e2e",
        "workspace": str(workspace),
        "stages": PIPELINE,
        "sources": [
            {
                "kind": "synthetic",
                "n_videos": 4,
                "n_long": 0,
                "seed": 3,
                "heldout_fraction": 0.5,
                "max_objects": 1,
            }
        ],
        "shard": {"target_bytes": 2_000_000, "max_side": 112, "fps": 4},
        "pack": {"max_tokens": 1024, "tokenizer": {"path": None, "vocab_size": 512}},
        "train": {
            "preset": "tiny",
            "stages": [
                {
                    "name": "sft",
                    "kind": "sft",
                    "steps": 3,
                    "lr": 1e-3,
                    "warmup_steps": 1,
                    "tokens_per_step": 1024,
                }
            ],
        },
        "eval": {"batch_size": 8, "limit": 2, "max_new_tokens": 2},
        "runner": {"kind": "thread", "max_workers": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _tree(pids: list[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return procs


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            continue
    return out


def _check_prefect_artifacts(client, flow_run_id) -> None:
    """Every stage flow run carries its summary (markdown) and counts (table); the parent its run summary; the
    stage's headline reached the flow-run log."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
    )
    run_ids = [flow_run_id, *(c.id for c in children)]
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
    )
    by_key = {}
    for a in artifacts:
        by_key.setdefault(a.key, []).append(a)
    for stage in ("ingest", "caption", "shard", "pack", "train-sft", "eval"):  # a training run per recipe
        assert f"{stage}-summary" in by_key, sorted(by_key)
        assert f"{stage}-counts" in by_key, sorted(by_key)
    assert (
        "MLflow run" in by_key["ingest-summary"][0].data
        and "/#/experiments/" in by_key["ingest-summary"][0].data
    )
    scores = by_key["eval-scores"][0]
    rows = json.loads(scores.data)  # a table artifact's data is its rows as JSON
    assert {"benchmark", "score", "chance", "below chance"} <= set(rows[0])
    assert {r["benchmark"] for r in rows} >= {"videomme", "timelens"}
    (summary,) = by_key["pipeline-summary"]
    assert summary.flow_run_id == flow_run_id and "Keye pipeline summary" in summary.data
    ingest_run = next(c for c in children if c.id == by_key["ingest-summary"][0].flow_run_id)
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[ingest_run.id])))
    assert any(line.message.startswith("ingest: videos_ok 4") for line in logs), [x.message for x in logs]


def _check_mlflow_rest(url: str, parent_id: str) -> None:
    """What the MLflow UI reads, through its REST API."""
    import httpx

    exp = httpx.get(
        f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "keye"}
    ).json()
    tags = {t["key"]: t["value"] for t in exp["experiment"].get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    parent = httpx.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": parent_id}).json()["run"]
    assert re.fullmatch(r"e2e-[0-9a-f]{8}-\d{4}-\d{2}-\d{2}", parent["info"]["run_name"]), parent["info"]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["videos_ok"] == 4 and metrics["shard_samples"] >= 1 and metrics["packs"] >= 1
    assert {
        "videomme/accuracy",
        "videomme/chance",
        "vision/mcq_accuracy",
        "vision/mcq_blank_accuracy",
    } <= set(metrics)
    exp_id = exp["experiment"]["experiment_id"]
    runs = httpx.post(
        f"{url}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"},
    ).json()["runs"]
    by_stage = {r["info"]["run_name"]: r for r in runs}
    train = by_stage["train:sft"]
    train_metrics = {m["key"] for m in train["data"]["metrics"]}
    assert (
        "system/cpu_utilization_percentage" in train_metrics
        and "system/system_memory_usage_megabytes" in train_metrics
    )
    assert "loss" in train_metrics
    datasets = {d["dataset"]["name"]: d for r in runs for d in r.get("inputs", {}).get("dataset_inputs", [])}
    assert any(n.startswith("pack-index-ps") for n in datasets), sorted(datasets)
    assert any(n.startswith("heldout-videomme-e") for n in datasets), sorted(datasets)
    assert all(
        {"key": "keye.lineage_id", "value": d["dataset"]["digest"]} in d["tags"] for d in datasets.values()
    )
    assert all(next(t["value"] for t in r["data"]["tags"] if t["key"] == "cached") == "false" for r in runs)


def _check_registered_model(url: str, ws: Path) -> None:
    """The registry's `best` is a pyfunc chat model with a signature that answers a prompt about a video."""
    import mlflow

    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model("models:/keye@best")
    assert [c["name"] for c in model.metadata.signature.inputs.to_dict()] == ["messages", "video"]
    video = sorted((ws / "videos").rglob("*.mp4"))[0]
    answers = model.predict(
        [{"messages": [{"role": "user", "content": "What colour is the shape?"}], "video": str(video)}]
    )
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.slow
def test_deploy_trigger_and_track_end_to_end(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = tmp_path / "ws"
    base = random.randint(20000, 50000)
    processes: list[psutil.Process] = []
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        urls = services.up(ws, prefect_port=base, mlflow_port=base + 1, auto_port=True, timeout_s=300)
        timings["up"] = time.monotonic() - t0
        state = services.read_state(ws)
        assert {s["name"] for s in state["services"]} == {"prefect", "mlflow", "worker"}
        pids = [s["pid"] for s in state["services"]]
        # idempotent: a second `up` finds the running services instead of starting new ones
        assert services.up(ws, prefect_port=base, mlflow_port=base + 1, auto_port=True) == urls
        assert [s["pid"] for s in services.read_state(ws)["services"]] == pids
        # another workspace on the same ports is refused, naming the port
        with pytest.raises(services.ServiceError, match="already in use"):
            services.up(tmp_path / "other", prefect_port=int(urls["prefect"].rsplit(":", 1)[1]))

        env = {**os.environ, "PREFECT_API_URL": urls["prefect_api"], "PREFECT_HOME": str(ws / "prefect")}
        deployed = subprocess.run(
            [services.console_script("prefect"), "--no-prompt", "deploy", "--all"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        timings["deploy"] = time.monotonic() - t0 - timings["up"]

        config = _tiny_config(tmp_path / "tiny.yaml", ws)
        with (
            temporary_settings({PREFECT_API_URL: urls["prefect_api"]}),
            get_client(sync_client=True) as client,
        ):
            deployment = client.read_deployment_by_name("pipeline/pipeline")
            assert deployment.work_pool_name == "keye-process"
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
            ]
            assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [("0 2 * * *", False)]
            with pytest.raises(PrefectHTTPStatusError, match="409|422"):  # the schema rejects a wrong type
                client.create_flow_run_from_deployment(deployment.id, parameters={"stages": "ingest"})
            # stage deployments take a PipelineConfig: keye.core.config's own constraints guard the UI form
            ingest = client.read_deployment_by_name("ingest/ingest")
            for bad in (
                {"ingest": {"batch_size": 0}},
                {"no_such_field": 1},
                {"caption": {"backend": "nope"}},
            ):
                with pytest.raises(PrefectHTTPStatusError, match="409|422"):
                    client.create_flow_run_from_deployment(ingest.id, parameters={"config": bad})
            assert {client.read_deployment_by_name(f"{n}/{n}").entrypoint for n in STAGES} == {
                f"flows/{n}.py:{n}" for n in STAGES
            }

            run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"config_path": str(config), "workspace": str(ws), "stages": PIPELINE},
            )
            t_run = time.monotonic()
            deadline = t_run + 600
            while True:
                state_now = client.read_flow_run(run.id).state
                processes += _tree(pids)  # remember the flow-run processes the worker starts
                if state_now is not None and state_now.is_final():
                    break
                assert time.monotonic() < deadline, f"flow run still {state_now} after 600 s"
                time.sleep(1)
            timings["run"] = time.monotonic() - t_run
            worker_log = Path(ws / services.LOG_DIR / "prefect-worker.log").read_text()[-4000:]
            assert state_now.type.value == "COMPLETED", f"{state_now}\n{worker_log}"
            _check_prefect_artifacts(client, run.id)

        mlflow = MlflowClient(tracking_uri=urls["mlflow"])
        experiment = mlflow.get_experiment_by_name("keye")
        assert experiment is not None
        parents = mlflow.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`keye.prefect_flow_run_id` = '{run.id}'"
        )
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        parent = parents[0]
        assert "mlflow.parentRunId" not in parent.data.tags
        children = mlflow.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert sorted(c.info.run_name for c in children) == sorted([*PIPELINE[:-2], "train:sft", "eval"])
        assert all(c.info.status == "FINISHED" for c in children)
        shard_run = next(c for c in children if c.data.tags["keye.stage"] == "shard")
        assert shard_run.data.metrics["shard_samples"] >= 1  # stage metrics reached the server
        assert "pipeline_summary.json" in [a.path for a in mlflow.list_artifacts(parent.info.run_id)]
        _check_mlflow_rest(urls["mlflow"], parent.info.run_id)
        _check_registered_model(urls["mlflow"], ws)
    finally:
        processes += _tree([s["pid"] for s in (services.read_state(ws) or {}).get("services", [])])
        t_down = time.monotonic()
        stopped = services.down(ws)
        timings["down"] = time.monotonic() - t_down
        print("e2e timings (s):", {k: round(v, 1) for k, v in timings.items()})
    assert sorted(stopped) == ["mlflow", "prefect", "worker"]
    assert services.read_state(ws) is None
    deadline = time.monotonic() + 15
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(processes), [(p.pid, p.cmdline()[:4]) for p in _alive(processes)]
    assert services.down(ws) == []
