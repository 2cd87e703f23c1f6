"""`keye doctor`: is this machine ready to run the pipeline, and if not, the exact command that fixes it.

Why: the first failure a new user meets is usually the environment (a wrong prefect, a PyAV without libx264,
port 4200 taken by an old server), and it surfaces deep inside a flow run. Checking it up front, with the fix
spelled out, saves that hunt. Version ranges come from the installed package metadata (the same ranges as
pyproject.toml), so they never drift from what `pip install` resolved against.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from keye import services

# Distributions whose versions matter to a run: (distribution, the extra that provides it or None if required).
TRACKED: tuple[tuple[str, str | None], ...] = (
    ("torch", None),
    ("triton", "triton"),
    ("prefect", None),
    ("mlflow", None),
    ("duckdb", None),
    ("av", None),
    ("webdataset", None),
    ("pydantic", None),
    ("transformers", "hf"),
)
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
MIN_FREE_GIB = 5.0


@dataclass(frozen=True)
class Check:
    """One line of the report; `fix` is the exact command (or action) that repairs a failure."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


def known_good_ranges() -> dict[str, Requirement]:
    """Distribution -> requirement (specifier) as declared by keye: installed metadata, else pyproject.toml."""
    try:
        reqs = metadata.requires("keye") or []
    except metadata.PackageNotFoundError:
        reqs = _pyproject_requirements()
    out: dict[str, Requirement] = {}
    for text in reqs:
        req = Requirement(text)
        name = req.name.lower()
        if name not in out or not out[name].specifier:  # prefer the entry that pins a range
            out[name] = req
    return out


def _pyproject_requirements() -> list[str]:
    import tomllib

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.exists():
        return []
    project = tomllib.loads(path.read_text()).get("project", {})
    reqs = list(project.get("dependencies", []))
    for extra, items in project.get("optional-dependencies", {}).items():
        reqs += [f'{item}; extra == "{extra}"' for item in items]
    return reqs


def check_version(dist: str, requirement: Requirement | None, extra: str | None = None) -> Check:
    """Installed version of `dist` against keye's declared range; optional extras may be absent."""
    spec = str(requirement.specifier) if requirement is not None else ""
    pin = f"{dist}{spec}" if spec else dist
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        if extra is not None:
            return Check(
                dist, True, f"not installed (optional, extra [{extra}])", f"pip install -e '.[{extra}]'"
            )
        return Check(dist, False, f"not installed (needs {pin})", f"pip install '{pin}'")
    if not spec:
        return Check(dist, True, installed)
    try:
        inside = requirement.specifier.contains(Version(installed), prereleases=True)
    except InvalidVersion:
        inside = False
    if inside:
        return Check(dist, True, f"{installed} (known-good {spec})")
    return Check(dist, False, f"{installed} is outside the known-good range {spec}", f"pip install '{pin}'")


def check_python() -> Check:
    """Which interpreter runs keye (the package itself requires >= 3.11, so an older one never gets here)."""
    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", True, f"{version} ({sys.executable})")


def check_cuda() -> Check:
    """CUDA is optional (the tiny preset and the kernel references run on CPU); report what is there."""
    try:
        import torch
    except Exception as exc:  # a broken torch install raises more than ImportError
        return Check("cuda", False, f"torch does not import: {exc}", "pip install torch==2.13.0")
    if not torch.cuda.is_available():
        return Check("cuda", True, f"no CUDA device (torch {torch.__version__}): CPU path, `tiny` preset")
    devices = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return Check("cuda", True, f"CUDA {torch.version.cuda}: " + "; ".join(devices))


def check_encoder(codec: str = "libx264") -> Check:
    """Shards re-encode clips to H.264 through PyAV's bundled FFmpeg."""
    try:
        import av
    except Exception as exc:
        return Check(f"encoder {codec}", False, f"PyAV does not import: {exc}", "pip install 'av>=14'")
    if codec in av.codecs_available:
        try:
            av.codec.Codec(codec, "w")
            return Check(
                f"encoder {codec}", True, f"available (PyAV {av.__version__}, FFmpeg inside the wheel)"
            )
        except Exception as exc:
            reason = str(exc)
    else:
        reason = "not in av.codecs_available"
    return Check(
        f"encoder {codec}",
        False,
        f"{codec} encoder missing from PyAV {av.__version__}: {reason}",
        "pip install --force-reinstall --no-cache-dir 'av>=14'  # the PyPI wheels ship FFmpeg with libx264",
    )


def check_port(name: str, port: int, workspace: Path) -> Check:
    """A busy port is fine when this workspace's `keye up` holds it; otherwise `keye up` would be refused."""
    ours = {r.get("port") for r in (services.read_state(workspace) or {}).get("services", [])}
    label = f"port {port} ({name})"
    if services.port_is_free(port):
        return Check(label, True, "free")
    if port in ours:
        return Check(label, True, "in use by this workspace's `keye up`")
    return Check(
        label,
        False,
        f"in use by {_listener(port)}",
        f"lsof -iTCP:{port} -sTCP:LISTEN  # who holds it; stop it, or: keye up --{name}-port {port + 1}",
    )


def check_services(workspace: Path) -> Check:
    """Whether this workspace's `keye up` is running; a state file whose processes died is stale."""
    state = services.read_state(workspace)
    if state is None:
        return Check("services", True, f"not running (start them: keye up --workspace {workspace})")
    records = [services.ServiceRecord(**r) for r in state.get("services", [])]
    dead = [r.name for r in records if not services.is_running(r)]
    if dead:
        return Check(
            "services",
            False,
            f"recorded but not running: {', '.join(dead)} (logs in {workspace / services.LOG_DIR})",
            f"keye down --workspace {workspace} && keye up --workspace {workspace}",
        )
    return Check(
        "services", True, "running: " + ", ".join(f"{k} {v}" for k, v in state.get("urls", {}).items())
    )


def ports_to_check(workspace: Path) -> dict[str, int]:
    """The ports `keye up` would use here: those recorded by a running `keye up`, else the defaults."""
    recorded = {
        r["name"]: r["port"]
        for r in (services.read_state(workspace) or {}).get("services", [])
        if r.get("port")
    }
    return {**DEFAULT_PORTS, **recorded}


def _listener(port: int) -> str:
    """Best effort: which process listens on `port` (needs privileges on some systems)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(workspace: Path, min_free_gib: float = MIN_FREE_GIB) -> Check:
    base = _existing_ancestor(workspace)
    if not base.is_dir():
        base = base.parent
    free = shutil.disk_usage(base).free / 2**30
    detail = f"{free:.1f} GiB free at {base}"
    if free >= min_free_gib:
        return Check("disk", True, detail)
    return Check(
        "disk",
        False,
        f"{detail}; want >= {min_free_gib:.0f} GiB",
        f"free space on that volume, or pass --workspace on a larger one (du -sh {base}/* finds the big items)",
    )


def check_writable(workspace: Path) -> Check:
    """Try a real write: permission bits lie for root, read-only mounts and ACLs."""
    workspace = workspace.resolve()
    target = workspace if workspace.exists() else _existing_ancestor(workspace)
    fix = f"mkdir -p {workspace} && chmod u+rwx {workspace}  # or pass --workspace DIR somewhere writable"
    if not target.is_dir():
        return Check("workspace", False, f"{target} is not a directory", fix)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".keye-doctor-") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return Check("workspace", False, f"cannot write in {target}: {exc.strerror or exc}", fix)
    where = "exists" if target == workspace else f"will be created under {target}"
    return Check("workspace", True, f"{workspace} is writable ({where})")


def check_commands() -> Check:
    """`keye up` runs the prefect and mlflow console scripts of this environment."""
    missing = []
    for name in ("prefect", "mlflow"):
        try:
            services.console_script(name)
        except services.ServiceError:
            missing.append(name)
    if not missing:
        return Check("commands", True, "prefect and mlflow console scripts found")
    return Check("commands", False, f"not found: {', '.join(missing)}", "pip install -e .")


def job_world_size() -> int:
    """Ranks of the job this machine would run: WORLD_SIZE (under torchrun), else its CUDA devices, else 1."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    import torch

    return max(1, torch.cuda.device_count())


def check_mesh(config: Path | None = None, world: int | None = None) -> Check:
    """The device mesh (dp_shard x ep x cp) that train.parallel gives for this job's world size."""
    from keye.core.config import ConfigError, load_config
    from keye.model.config import preset
    from keye.train.parallel import MeshError, resolve_mesh

    if config is None and Path("pipelines.yaml").is_file():
        config = Path("pipelines.yaml")
    world = world or job_world_size()
    try:
        t = load_config(config).train
        shape = resolve_mesh(t.parallel, world, preset(t.preset).lm.num_experts)
    except (ConfigError, MeshError) as e:
        return Check(
            "mesh", False, str(e), "set train.parallel (dp_shard, ep, cp) so their product is the world size"
        )
    return Check(
        "mesh", True, f"{t.preset}: {shape.describe()} (train.parallel of {config or 'the built-in config'})"
    )


def run_checks(workspace: Path, config: Path | None = None) -> list[Check]:
    """Every check, in the order a person would fix them; never raises for a failing check."""
    workspace = Path(workspace)
    ranges = known_good_ranges()
    steps: list[tuple[str, Callable[[], Check]]] = [("python", check_python), ("cuda", check_cuda)]
    steps += [(d, lambda d=d, e=e: check_version(d, ranges.get(d), e)) for d, e in TRACKED]
    steps += [("encoder libx264", check_encoder), ("commands", check_commands)]
    steps += [
        (f"port {p}", lambda n=n, p=p: check_port(n, p, workspace))
        for n, p in ports_to_check(workspace).items()
    ]
    steps += [
        ("services", lambda: check_services(workspace)),
        ("disk", lambda: check_disk(workspace)),
        ("workspace", lambda: check_writable(workspace)),
        ("mesh", lambda: check_mesh(config)),
    ]
    out = []
    for name, step in steps:
        try:
            out.append(step())
        except Exception as exc:  # a check that crashes is itself a finding, not a reason to stop
            out.append(
                Check(
                    name,
                    False,
                    f"the check itself failed: {exc!r}",
                    "pip install -e . (then report it if it stays)",
                )
            )
    return out


def render(checks: list[Check]) -> str:
    """Plain-text report: one line per check, the fix under each failure, and a summary line."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{'ok  ' if c.ok else 'FAIL'}  {c.name.ljust(width)}  {c.detail}")
        if c.fix and not c.ok:
            lines.append(f"      {' ' * width}  fix: {c.fix}")
        elif c.fix:
            lines.append(f"      {' ' * width}  to add: {c.fix}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks)} checks, {failed} failed" + ("" if failed else ": ready"))
    return "\n".join(lines)
