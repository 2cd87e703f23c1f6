"""What a killed run leaves behind, cleaned up when the next run starts on the same workspace.

A SIGKILL (or OOM kill, or power loss) runs no `finally`: the run's lineage rows stay `running`, its MLflow runs
stay RUNNING, and the temporary Prefect server it started (a child uvicorn process, see
prefect.server.api.server.SubprocessASGIServer) is orphaned. The next run holds the workspace lock, so nothing else
can legitimately be running on this workspace then: every `running` row not started by this process is stale. It is
marked `killed`, with the reason in `run_notes`; its MLflow run (and RUNNING runs nested under it or tagged with this
workspace) are set KILLED with a `keye.killed_reason` tag; and ephemeral Prefect servers whose PREFECT_HOME is this
workspace's and which are not this process's children are stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from keye.core.lineage import Lineage
from keye.core.workspace import Workspace

EPHEMERAL_APP = "prefect.server.api.server:create_app"

_own_runs: set[str] = set()  # lineage run ids started by this process: alive by definition


def own_run(run_id: str) -> None:
    """Called when this process starts a lineage run, so recovery never touches it."""
    _own_runs.add(run_id)


@dataclass
class Recovery:
    runs_killed: list[str] = field(default_factory=list)
    mlflow_killed: list[str] = field(default_factory=list)
    servers_stopped: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str | None:
        if not (self.runs_killed or self.mlflow_killed or self.servers_stopped):
            return None
        return (
            f"recovered from a killed run: {len(self.runs_killed)} lineage run(s) marked killed, "
            f"{len(self.mlflow_killed)} MLflow run(s) set KILLED, {len(self.servers_stopped)} orphaned Prefect "
            f"server(s) stopped{' (pids ' + ', '.join(map(str, self.servers_stopped)) + ')' if self.servers_stopped else ''}"
        )


def mark_stale_runs(lineage: Lineage, reason: str) -> list[dict[str, Any]]:
    """Stale `running` rows (not started by this process) -> `killed`, with the reason noted."""
    return lineage.mark_killed(reason, keep=_own_runs)


def kill_stale_mlflow_runs(
    ws: Workspace, uri: str | None, experiment: str, stale_ids: list[str], reason: str
) -> list[str]:
    """RUNNING MLflow runs of the stale lineage rows, nested under them, or tagged with this workspace."""
    from keye.core.tracking import default_uri, make_client

    uri = uri or os.environ.get("KEYE_MLFLOW_URI") or default_uri(ws)
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        return []  # no MLflow store yet: nothing can be RUNNING
    client = make_client(ws, uri)
    exp = client.get_experiment_by_name(experiment)
    candidates = set(stale_ids)
    if exp is not None:
        running = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
        parents = {r.info.run_id for r in running if r.data.tags.get("keye.workspace") == str(ws.root)}
        candidates |= parents
        candidates |= {r.info.run_id for r in running if r.data.tags.get("mlflow.parentRunId") in candidates}
    killed = []
    for run_id in sorted(candidates):
        try:
            if client.get_run(run_id).info.status != "RUNNING":
                continue
            client.set_tag(run_id, "keye.killed_reason", reason)
            client.set_terminated(run_id, "KILLED")
            killed.append(run_id)
        except Exception as e:  # a run deleted meanwhile, a server that went away: report, go on
            print(f"warning: could not mark MLflow run {run_id} KILLED: {e}", file=sys.stderr)
    return killed


def orphaned_prefect_servers(ws: Workspace) -> list[Any]:
    """Temporary Prefect servers started for this workspace by a process that is gone (not our children)."""
    import psutil

    me = os.getpid()
    home = str(ws.prefect_home)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if EPHEMERAL_APP not in (proc.info["cmdline"] or []) or proc.pid == me:
                continue
            env = proc.environ()
            if env.get("PREFECT__SERVER_EPHEMERAL") != "1" or env.get("PREFECT_HOME") != home:
                continue
            if any(p.pid == me for p in proc.parents()):
                continue  # this run's own server
            found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_processes(procs: list[Any], grace_s: float = 5.0) -> list[int]:
    import psutil

    stopped = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            stopped.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return stopped


def recover_after_crash(
    ws: Workspace, lineage: Lineage, new_run_id: str, tracking_uri: str | None, experiment: str
) -> Recovery:
    """Call with the workspace lock held, before this run starts anything. Never raises for a cleanup problem:
    a run must not fail because the previous one left a mess; what could not be done is printed."""
    out = Recovery()
    reason = (
        f"still running when run {new_run_id} started on this workspace at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
        "its process died without closing it (SIGKILL, out-of-memory kill or power loss)"
    )
    stale = mark_stale_runs(lineage, reason)
    out.runs_killed = [r["run_id"] for r in stale]
    try:
        out.mlflow_killed = kill_stale_mlflow_runs(
            ws, tracking_uri, experiment, [r["mlflow_run_id"] for r in stale if r["mlflow_run_id"]], reason
        )
    except Exception as e:
        out.warnings.append(f"could not check MLflow for runs left RUNNING: {e}")
    try:
        out.servers_stopped = stop_processes(orphaned_prefect_servers(ws))
    except Exception as e:
        out.warnings.append(f"could not look for orphaned Prefect servers: {e}")
    for w in out.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if out.line():
        print(out.line(), file=sys.stderr)
    return out
