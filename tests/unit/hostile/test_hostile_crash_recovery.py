"""Issue 16, finding 7: after a SIGKILL, the next run on the workspace marks the killed run's lineage rows `killed`
(with the reason), sets its MLflow runs KILLED, and stops the temporary Prefect server the killed run orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]

KILLED_RUN = """
import os, signal, sys
from keye.stages.artifact import configure_environment
from keye.core.workspace import Workspace
configure_environment(Workspace.at(sys.argv[2]))  # as `keye run` does: Prefect's home inside the workspace
import keye.stages.ingest as ing
def dying(files, settings):  # the process dies in the middle of the ingest stage; its children live on
    os.kill(os.getpid(), signal.SIGKILL)
ing.ingest_videos = dying
from flows.pipeline import pipeline
pipeline(config_path=sys.argv[1])
"""


def _server_pids(ws: Path) -> list[int]:
    from keye.core.workspace import Workspace
    from keye.stages.crash_recovery import orphaned_prefect_servers

    return [p.pid for p in orphaned_prefect_servers(Workspace.at(ws))]


def test_next_run_cleans_up_after_a_sigkill(tmp_path):
    ws = tmp_path / "ws"
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not really a video" * 10)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            workspace: {ws}
            stages: [ingest]
            sources: [{{path: {videos}}}]
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, str(cfg), str(ws)],
            env=env,
            stdout=out,
            stderr=out,
            timeout=600,
        )
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]

    from mlflow.tracking import MlflowClient

    from keye.core.lineage import Lineage

    def states():
        runs = Lineage(ws, read_only=True).query("SELECT run_id, kind, status FROM runs ORDER BY started_at")
        client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
        exp = client.get_experiment_by_name("keye")
        ml = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
        return runs, ml

    runs, ml = states()
    killed_ids = {r["run_id"] for r in runs}
    assert {r["status"] for r in runs} == {"running"} and {r["kind"] for r in runs} == {"pipeline", "stage"}
    assert {r.info.status for r in ml.values()} == {"RUNNING"} and len(ml) == 2
    orphans = _server_pids(ws)
    assert orphans, "the killed run's temporary Prefect server should be left behind (what is cleaned up)"

    r = subprocess.run(
        [sys.executable, "-m", "keye.cli", "ingest", str(videos), "--workspace", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "recovered from a killed run" in r.stderr, r.stderr[-3000:]
    runs, ml = states()
    old = [x for x in runs if x["run_id"] in killed_ids]
    assert {x["status"] for x in old} == {"killed"}, old
    assert {x["status"] for x in runs if x["run_id"] not in killed_ids} == {"completed"}
    notes = Lineage(ws, read_only=True).query("SELECT run_id, reason FROM run_notes")
    assert {n["run_id"] for n in notes} == killed_ids and all("died" in n["reason"] for n in notes)
    old_ml = [m for m in ml.values() if m.data.tags.get("keye.lineage_run_id") in killed_ids]
    assert len(old_ml) == 2 and {m.info.status for m in old_ml} == {"KILLED"}
    assert all("keye.killed_reason" in m.data.tags for m in old_ml)
    assert all(m.info.status == "FINISHED" for m in ml.values() if m not in old_ml)
    deadline = time.monotonic() + 15
    import psutil

    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in orphans):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in orphans)
    assert _server_pids(ws) == []
