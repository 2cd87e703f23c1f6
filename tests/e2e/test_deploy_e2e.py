"""End to end, as a user would: `keye up`, `prefect deploy`, a run triggered through the API (what the UI's
"Run" button calls), the worker executes it, MLflow lists the parent and stage runs, `keye down` leaves nothing."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from keye import services

REPO = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "caption", "shard"]


def _tiny_config(path: Path, workspace: Path) -> Path:
    config = {
        "name": "e2e",
        "workspace": str(workspace),
        "stages": STAGES,
        "sources": [{"kind": "synthetic", "n_videos": 2, "n_long": 0, "seed": 3}],
        "shard": {"target_bytes": 2_000_000, "max_side": 112, "fps": 4},
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
                parameters={"config_path": str(config), "workspace": str(ws), "stages": STAGES},
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
        assert sorted(c.data.tags.get("keye.stage") for c in children) == sorted(STAGES)
        assert all(c.info.status == "FINISHED" for c in children)
        shard_run = next(c for c in children if c.data.tags["keye.stage"] == "shard")
        assert shard_run.data.metrics["shard_samples"] >= 1  # stage metrics reached the server
        assert "pipeline_summary.json" in [a.path for a in mlflow.list_artifacts(parent.info.run_id)]
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
