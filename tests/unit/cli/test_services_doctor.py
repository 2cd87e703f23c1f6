"""keye.doctor: every failure comes with its fix; checks read the real environment."""

from __future__ import annotations

import importlib.metadata as metadata
import socket
from pathlib import Path

from packaging.requirements import Requirement

from keye import doctor, services


def test_run_checks_reports_the_environment(tmp_path: Path) -> None:
    checks = doctor.run_checks(tmp_path / "ws")
    names = [c.name for c in checks]
    for expected in (
        "python",
        "cuda",
        "torch",
        "prefect",
        "mlflow",
        "duckdb",
        "av",
        "webdataset",
        "transformers",
    ):
        assert expected in names
    for expected in ("encoder libx264", "port 4200 (prefect)", "port 5000 (mlflow)", "disk", "workspace"):
        assert expected in names
    by_name = {c.name: c for c in checks}
    assert metadata.version("prefect") in by_name["prefect"].detail
    assert by_name["workspace"].ok  # tmp_path is writable; the workspace would be created under it
    assert all(c.fix for c in checks if not c.ok), [c for c in checks if not c.ok and not c.fix]
    assert not (tmp_path / "ws").exists()  # the doctor looks, it does not create


def test_known_good_ranges_come_from_the_package_metadata() -> None:
    ranges = doctor.known_good_ranges()
    assert "prefect" in ranges and ranges["prefect"].specifier.contains(metadata.version("prefect"))
    assert str(ranges["mlflow"].specifier)  # a real range, not a bare name


def test_version_outside_the_range_fails_with_the_install_command() -> None:
    bad = doctor.check_version("prefect", Requirement("prefect>=99"))
    assert not bad.ok and "outside the known-good range >=99" in bad.detail
    assert bad.fix == "pip install 'prefect>=99'"
    good = doctor.check_version("prefect", Requirement("prefect>=3"))
    assert good.ok and good.fix is None
    missing = doctor.check_version("keye-no-such-dist", Requirement("keye-no-such-dist>=1"))
    assert not missing.ok and missing.fix == "pip install 'keye-no-such-dist>=1'"
    optional = doctor.check_version("keye-no-such-dist", None, extra="hf")
    assert optional.ok and optional.fix == "pip install -e '.[hf]'"


def test_busy_port_fails_unless_it_is_our_own_server(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    try:
        busy = doctor.check_port("prefect", port, tmp_path)
        assert not busy.ok and f"lsof -iTCP:{port}" in (busy.fix or "")
        services.write_state(tmp_path, {"urls": {}, "services": [{"name": "prefect", "port": port}]})
        assert doctor.check_port("prefect", port, tmp_path).ok
    finally:
        sock.close()
    assert doctor.check_port("prefect", port, tmp_path / "other").ok


def test_unwritable_workspace_and_low_disk_fail_with_a_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = doctor.check_writable(blocker / "ws")  # works as root too, unlike chmod
    assert not bad.ok and "mkdir -p" in (bad.fix or "")
    assert doctor.check_writable(tmp_path).ok
    low = doctor.check_disk(tmp_path, min_free_gib=1e9)
    assert not low.ok and low.fix and "GiB free" in low.detail
    assert doctor.check_disk(tmp_path, min_free_gib=0).ok


def test_render_shows_failures_with_their_fix() -> None:
    checks = [
        doctor.Check("torch", True, "2.13.0"),
        doctor.Check("port 4200 (prefect)", False, "in use by pid 1 (x)", "lsof -iTCP:4200 -sTCP:LISTEN"),
    ]
    text = doctor.render(checks)
    assert "ok    torch" in text
    assert "FAIL  port 4200 (prefect)" in text
    assert "fix: lsof -iTCP:4200 -sTCP:LISTEN" in text
    assert text.splitlines()[-1] == "2 checks, 1 failed"
    assert doctor.render(checks[:1]).endswith("1 checks, 0 failed: ready")


def test_services_check_spots_a_stale_state_file(tmp_path: Path) -> None:
    assert doctor.check_services(tmp_path).ok  # nothing recorded: fine, says how to start
    dead = {"name": "prefect", "pid": 2**22 + 7, "create_time": 1.0, "cmd": ["x"], "log": "l", "port": 4311}
    services.write_state(tmp_path, {"urls": {"prefect": "http://127.0.0.1:4311"}, "services": [dead]})
    stale = doctor.check_services(tmp_path)
    assert not stale.ok and "prefect" in stale.detail and "keye down" in (stale.fix or "")
    assert doctor.ports_to_check(tmp_path) == {"prefect": 4311, "mlflow": 5000}


def test_a_crashing_check_becomes_a_failed_line(tmp_path: Path, monkeypatch) -> None:
    def boom() -> doctor.Check:
        raise RuntimeError("broken install")

    monkeypatch.setattr(doctor, "check_encoder", boom)
    checks = {c.name: c for c in doctor.run_checks(tmp_path)}
    bad = checks["encoder libx264"]
    assert not bad.ok and "broken install" in bad.detail and bad.fix
