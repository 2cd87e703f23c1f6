"""keye.services mechanics without real servers: state file, ports, start/stop of exactly our processes."""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from keye import services


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((services.HOST, port))
    sock.listen(1)
    return sock


def _spawn(tmp_path: Path, code: str, name: str = "dummy") -> services.ServiceRecord:
    return services.start_process(
        name,
        [sys.executable, "-c", code],
        {"PATH": "/usr/bin:/bin"},
        tmp_path / "logs" / f"{name}.log",
        tmp_path,
    )


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


SLEEPER = "import time\nwhile True: time.sleep(0.1)"
# A parent that starts a grandchild in its own session, like the process worker does with flow runs.
PARENT_WITH_DETACHED_CHILD = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.1)'],"
    " start_new_session=True)\n"
    "print(child.pid, flush=True)\n"
    "while True: time.sleep(0.1)\n"
)
IGNORES_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
    "while True: time.sleep(0.1)"
)


def test_state_roundtrip_is_atomic(tmp_path: Path) -> None:
    assert services.read_state(tmp_path) is None
    state = {"urls": {"prefect": "http://127.0.0.1:1"}, "services": []}
    services.write_state(tmp_path, state)
    assert services.read_state(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == [services.STATE_FILE]  # no temp file left behind
    services.state_path(tmp_path).write_text("{not json")
    assert services.read_state(tmp_path) is None


def test_keye_up_names_the_worker_and_its_log(tmp_path: Path) -> None:
    assert services.describe_worker(tmp_path) is None
    worker = services.ServiceRecord(
        "worker", 4242, 0.0, ["prefect"], str(tmp_path / "logs" / "prefect-worker.log")
    )
    services.write_state(tmp_path, {"pool": "keye-process", "urls": {}, "services": [asdict(worker)]})
    line = services.describe_worker(tmp_path)
    assert line == f"pid 4242, polls work pool 'keye-process'; log {tmp_path / 'logs' / 'prefect-worker.log'}"


def test_busy_port_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    sock = _listen()
    port = sock.getsockname()[1]
    try:
        assert not services.port_is_free(port)
        with pytest.raises(services.ServiceError, match=rf"port {port} .* already in use"):
            services.up(tmp_path / "ws", prefect_port=port, mlflow_port=port + 1)
        assert services.read_state(tmp_path / "ws") is None  # nothing was started
        with pytest.raises(services.ServiceError, match="mlflow: port"):
            services.up(tmp_path / "ws", prefect_port=services.next_free_port(20000), mlflow_port=port)
        moved = services.next_free_port(port)
        assert moved != port and services.port_is_free(moved)
    finally:
        sock.close()


def test_stop_record_stops_the_group_and_detached_children(tmp_path: Path) -> None:
    rec = _spawn(tmp_path, PARENT_WITH_DETACHED_CHILD)
    deadline = time.monotonic() + 20
    while not Path(rec.log).read_text().strip().splitlines()[-1].isdigit():
        assert time.monotonic() < deadline, Path(rec.log).read_text()
        time.sleep(0.05)
    child_pid = int(Path(rec.log).read_text().strip().splitlines()[-1])
    assert services.is_running(rec) and psutil.pid_exists(child_pid)
    assert services.stop_record(rec, grace_s=5)
    assert _wait_gone(rec.pid) and _wait_gone(child_pid)
    assert not services.stop_record(rec)  # second stop: nothing left, nothing done


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    rec = _spawn(tmp_path, SLEEPER)
    try:
        impostor = services.ServiceRecord(**{**asdict(rec), "create_time": rec.create_time - 1000.0})
        assert not services.is_running(impostor)
        assert not services.stop_record(impostor)
        time.sleep(0.2)
        assert services.is_running(rec)
    finally:
        services.stop_record(rec, grace_s=2)
    assert _wait_gone(rec.pid)


def test_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    rec = _spawn(tmp_path, IGNORES_TERM)
    deadline = time.monotonic() + 20
    while "ready" not in Path(rec.log).read_text().splitlines():  # the header line also quotes the code
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    assert services.stop_record(rec, grace_s=1.0)
    assert _wait_gone(rec.pid)
    assert time.monotonic() - t0 >= 0.9  # SIGTERM was ignored: it waited the grace period, then SIGKILL


def test_down_stops_what_the_state_file_lists_and_is_idempotent(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    recs = [_spawn(tmp_path, SLEEPER, name) for name in ("prefect", "mlflow", "worker")]
    services.write_state(ws, {"urls": {}, "services": [asdict(r) for r in recs]})
    assert services.down(ws) == ["worker", "mlflow", "prefect"]
    assert all(_wait_gone(r.pid) for r in recs)
    assert services.read_state(ws) is None
    assert services.down(ws) == []


def test_health_wait_points_at_the_log(tmp_path: Path) -> None:
    port = services.next_free_port(21000)
    dies = _spawn(tmp_path, "import sys; print('boom: bad config'); sys.exit(3)", "dies")
    with pytest.raises(
        services.ServiceError, match=r"exited during start-up.*dies\.log(.|\n)*boom: bad config"
    ):
        services._wait_healthy(dies, f"http://127.0.0.1:{port}/health", timeout_s=20)
    hangs = _spawn(tmp_path, SLEEPER, "hangs")
    try:
        with pytest.raises(services.ServiceError, match=r"did not become healthy .* within 1 s.*hangs\.log"):
            services._wait_healthy(hangs, f"http://127.0.0.1:{port}/health", timeout_s=1.0)
    finally:
        services.stop_record(hangs, grace_s=2)


def test_service_env_keeps_stores_in_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "https://api.prefect.cloud/api/accounts/x")
    env = services.service_env(tmp_path)
    assert env["PREFECT_HOME"] == str(tmp_path.resolve() / "prefect")
    assert str(tmp_path.resolve()) in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "PREFECT_API_URL" not in env  # the servers never talk to a profile's remote API
    worker_env = services.service_env(tmp_path, "http://127.0.0.1:4200/api", "http://127.0.0.1:5000")
    assert worker_env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert worker_env["KEYE_MLFLOW_URI"] == worker_env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    json.dumps(env)  # plain strings only


def test_failed_start_stops_the_others_and_names_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripts = {
        "prefect": "import sys\nprint('database is locked', flush=True)\nsys.exit(1)\n",  # dies at once
        "mlflow": SLEEPER + "\n",  # would run forever
    }
    for name, code in scripts.items():
        path = tmp_path / f"fake-{name}"
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    monkeypatch.setattr(services, "console_script", lambda name: str(tmp_path / f"fake-{name}"))
    ws = tmp_path / "ws"
    with pytest.raises(
        services.ServiceError, match=r"prefect exited during start-up.*prefect-server\.log(.|\n)*locked"
    ):
        services.up(
            ws, prefect_port=services.next_free_port(22000), mlflow_port=services.next_free_port(23000)
        )
    assert services.read_state(ws) is None
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path / "fake-mlflow") in (p.info["cmdline"] or [])
    ]
    assert not [p for p in leftovers if p.status() != psutil.STATUS_ZOMBIE]
