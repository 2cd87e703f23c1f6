"""Local Prefect server, MLflow server and a process worker for one workspace (`keye up` / `keye down`).

Why: users trigger runs from the Prefect UI and compare them in MLflow; on a laptop that has to be one command,
with every store inside the workspace, and `keye down` must stop exactly what `keye up` started (never a
stranger that reused a pid), so each child is recorded with its pid, process group and creation time.
Follows the Prefect 3.9 CLIs (`prefect server start`, `prefect worker start --type process`) and MLflow 3.17
(`mlflow server`, sqlite backend, proxied artifacts). This module never imports prefect or mlflow: it drives
their command lines and HTTP health endpoints only. POSIX only (sessions and process groups).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

HOST = "127.0.0.1"
STATE_FILE = "services.json"
LOG_DIR = "logs"
DEFAULT_TIMEOUT_S = 180.0
GRACE_S = 10.0


class ServiceError(RuntimeError):
    """A service could not be started or checked; the message says why and where its log is."""


@dataclass
class ServiceRecord:
    """One started process as written in the state file; enough to find it again and to prove it is ours."""

    name: str
    pid: int
    create_time: float
    cmd: list[str]
    log: str
    port: int | None = None
    url: str | None = None


def state_path(workspace: Path) -> Path:
    return Path(workspace) / STATE_FILE


def read_state(workspace: Path) -> dict | None:
    """The state file of the last `up` in this workspace, or None when nothing is recorded."""
    path = state_path(workspace)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_state(workspace: Path, state: dict) -> None:
    """Atomic write (temp, fsync, rename) so a crash never leaves a half-written state file."""
    path = state_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when a server could bind host:port now (same SO_REUSEADDR semantics as uvicorn)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def next_free_port(start: int, taken: set[int] | None = None, host: str = HOST, span: int = 100) -> int:
    """The first free port at or after `start` (skipping `taken`), for `keye up` when asked to move aside."""
    taken = taken or set()
    for port in range(start, start + span):
        if port not in taken and port_is_free(port, host):
            return port
    raise ServiceError(f"no free port in {start}..{start + span - 1} on {host}")


def _resolve_port(name: str, port: int, auto: bool, taken: set[int]) -> int:
    if port not in taken and port_is_free(port):
        return port
    if auto:
        return next_free_port(port + 1, taken)
    raise ServiceError(
        f"{name}: port {port} on {HOST} is already in use. Stop whatever listens there "
        f"(`lsof -iTCP:{port} -sTCP:LISTEN` shows it; `keye down` if it is an earlier `keye up`), "
        f"or choose another port."
    )


def console_script(name: str) -> str:
    """The console script installed next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` is not installed in this environment; fix: pip install -e .")
    return found


def _log_tail(path: str | Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def start_process(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    cwd: Path,
    port: int | None = None,
    url: str | None = None,
) -> ServiceRecord:
    """Start `cmd` in its own session (so it and its children form one process group) with output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    create_time = psutil.Process(proc.pid).create_time()
    return ServiceRecord(
        name=name, pid=proc.pid, create_time=create_time, cmd=cmd, log=str(log), port=port, url=url
    )


def _same_process(record: ServiceRecord) -> psutil.Process | None:
    """The live process of `record`, or None when it is gone or the pid now belongs to someone else."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 0.5:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap(record.pid)
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (tests call up/down in-process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def is_running(record: ServiceRecord) -> bool:
    return _same_process(record) is not None


def _targets(record: ServiceRecord) -> list[psutil.Process]:
    """Every process that belongs to `record`: its process group (members no older than the leader) and its
    descendants (the process worker starts flow runs in their own sessions)."""
    found: dict[int, psutil.Process] = {}
    leader = _same_process(record)
    if leader is None and psutil.pid_exists(record.pid):
        return []  # the pid (hence the group id) now belongs to another process: not ours to touch
    if leader is not None:
        found[leader.pid] = leader
        try:
            for child in leader.children(recursive=True):
                found[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.pid in found or os.getpgid(proc.pid) != record.pid:
                continue
            if proc.info["create_time"] >= record.create_time - 0.5:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return list(found.values())


def stop_record(record: ServiceRecord, grace_s: float = GRACE_S) -> bool:
    """SIGTERM the record's processes, SIGKILL what is left after `grace_s`; True when something was stopped."""
    procs = _targets(record)
    if not procs:
        return False
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)  # psutil refuses if the pid was reused since we looked it up
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=5)
    _reap(record.pid)
    return True


def _records(state: dict | None) -> list[ServiceRecord]:
    if not state:
        return []
    return [ServiceRecord(**item) for item in state.get("services", [])]


def _wait_healthy(record: ServiceRecord, check_url: str, timeout_s: float, expect: str | None = None) -> None:
    """Poll `check_url` until it answers 200 (and contains `expect`); fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if not is_running(record):
            raise ServiceError(
                f"{record.name} exited during start-up; see its log {record.log}:\n{_log_tail(record.log)}"
            )
        try:
            resp = httpx.get(check_url, timeout=5.0)
            if resp.status_code == 200 and (expect is None or expect in resp.text):
                return
            last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise ServiceError(
        f"{record.name} did not become healthy at {check_url} within {timeout_s:.0f} s ({last_error}); "
        f"see its log {record.log}:\n{_log_tail(record.log)}"
    )


def _wait_worker(record: ServiceRecord, api_url: str, pool: str, timeout_s: float) -> None:
    """The worker is ready once its pool exists and it has sent a heartbeat (it then polls for runs)."""
    deadline = time.monotonic() + timeout_s
    last_error = "no worker heartbeat yet"
    while time.monotonic() < deadline:
        if not is_running(record):
            raise ServiceError(
                f"worker exited during start-up; see its log {record.log}:\n{_log_tail(record.log)}"
            )
        try:
            resp = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5.0)
            if resp.status_code == 200 and resp.json():
                return
            last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise ServiceError(
        f"worker for pool {pool!r} did not register within {timeout_s:.0f} s ({last_error}); "
        f"see its log {record.log}:\n{_log_tail(record.log)}"
    )


def service_env(workspace: Path, prefect_api_url: str | None = None, mlflow_url: str | None = None) -> dict:
    """Environment for the servers, the worker and the flow runs it starts: workspace-local stores, no
    analytics, and the URLs so runs report to these servers rather than to a profile's default."""
    workspace = Path(workspace).resolve()
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(workspace / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{workspace / 'prefect' / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": HOST,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("PREFECT_API_KEY", None)
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    else:
        env.pop("PREFECT_API_URL", None)
    if mlflow_url:
        env["MLFLOW_TRACKING_URI"] = mlflow_url
        env["KEYE_MLFLOW_URI"] = mlflow_url  # keye.core.tracking's override of the workspace sqlite default
    return env


def describe_worker(workspace: Path) -> str | None:
    """One line for `keye up`: the worker's pid, the pool it polls and the log that holds its flow runs' output."""
    state = read_state(workspace)
    for rec in _records(state):
        if rec.name == "worker":
            return f"pid {rec.pid}, polls work pool {state.get('pool')!r}; log {rec.log}"
    return None


def urls(workspace: Path) -> dict[str, str]:
    """Names -> URLs of the services recorded for this workspace (empty when none are running)."""
    state = read_state(workspace)
    return dict(state.get("urls", {})) if state else {}


def up(
    workspace: Path,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    worker: bool = True,
    pool: str = "keye-process",
    *,
    auto_port: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, str]:
    """Start (or find already running) the Prefect server, MLflow server and process worker for `workspace`.

    Returns names -> URLs. A busy port is refused with a clear message unless `auto_port`, which moves to the
    next free port. On any failure everything started so far is stopped again and ServiceError names the log.
    """
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    state = read_state(workspace)
    existing = _records(state)
    if existing:
        wanted = {"prefect", "mlflow"} | ({"worker"} if worker else set())
        alive = {r.name for r in existing if is_running(r)}
        if wanted <= alive and state.get("pool") == pool:
            return dict(state["urls"])
        down(workspace)  # stale or partial: clear it and start afresh

    taken: set[int] = set()
    prefect_port = _resolve_port("prefect", prefect_port, auto_port, taken)
    taken.add(prefect_port)
    mlflow_port = _resolve_port("mlflow", mlflow_port, auto_port, taken)

    prefect_url = f"http://{HOST}:{prefect_port}"
    api_url = f"{prefect_url}/api"
    mlflow_url = f"http://{HOST}:{mlflow_port}"
    out = {"prefect": prefect_url, "prefect_api": api_url, "mlflow": mlflow_url}
    logs = workspace / LOG_DIR
    (workspace / "prefect").mkdir(exist_ok=True)
    (workspace / "mlartifacts").mkdir(exist_ok=True)
    state = {
        "workspace": str(workspace),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pool": pool,
        "urls": out,
        "services": [],
    }
    started: list[ServiceRecord] = []

    def record(rec: ServiceRecord) -> ServiceRecord:
        started.append(rec)
        state["services"] = [asdict(r) for r in started]
        write_state(workspace, state)
        return rec

    try:
        env = service_env(workspace)
        env["PREFECT_SERVER_UI_API_URL"] = api_url  # else the UI calls :4200 whatever port the server has
        prefect = record(
            start_process(
                "prefect",
                [console_script("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
                env,
                logs / "prefect-server.log",
                workspace,
                prefect_port,
                prefect_url,
            )
        )
        mlflow = record(
            start_process(
                "mlflow",
                [
                    console_script("mlflow"),
                    "server",
                    "--host",
                    HOST,
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{workspace / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(workspace / "mlartifacts"),
                ],
                env,
                logs / "mlflow-server.log",
                workspace,
                mlflow_port,
                mlflow_url,
            )
        )
        _wait_healthy(prefect, f"{api_url}/health", timeout_s, expect="true")
        _wait_healthy(mlflow, f"{mlflow_url}/health", timeout_s)
        if worker:
            wrk = record(
                start_process(
                    "worker",
                    [
                        console_script("prefect"),
                        "worker",
                        "start",
                        "--pool",
                        pool,
                        "--type",
                        "process",
                        "--name",
                        f"keye-{socket.gethostname()}-{pool}",
                    ],
                    service_env(workspace, api_url, mlflow_url),
                    logs / "prefect-worker.log",
                    workspace,
                )
            )
            _wait_worker(wrk, api_url, pool, timeout_s)
    except BaseException:
        down(workspace)
        raise
    return dict(out)


def down(workspace: Path) -> list[str]:
    """Stop exactly the processes `up` recorded for `workspace` (pid and creation time must still match),
    SIGTERM then SIGKILL after a grace period, and remove the state file. Safe to call any number of times."""
    workspace = Path(workspace).resolve()
    stopped: list[str] = []
    for rec in reversed(_records(read_state(workspace))):  # worker first, servers last
        if stop_record(rec):
            stopped.append(rec.name)
    try:
        state_path(workspace).unlink()
    except FileNotFoundError:
        pass
    return stopped
