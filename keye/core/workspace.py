"""The workspace: where every artifact of a pipeline lives, and the lock that makes its orchestrator the one writer.

DuckDB allows one read-write process; two pipeline runs on one workspace would also race on shards and
checkpoints. So the orchestrating process holds an exclusive flock for its whole run, and a second run fails at
once with a message that says who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path


class WorkspaceLocked(RuntimeError):
    """Another process is running a pipeline on this workspace."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        return cls(Path(root).expanduser().resolve())

    @property
    def lineage_db(self) -> Path:
        return self.root / "lineage.duckdb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def lock_file(self) -> Path:
        return self.root / ".keye.lock"

    def ensure(self) -> Workspace:
        for d in (
            self.root,
            self.videos,
            self.shards,
            self.cache,
            self.packs,
            self.checkpoints,
            self.reports,
        ):
            d.mkdir(parents=True, exist_ok=True)
        return self


_held: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within one process
_held_guard = threading.Lock()


class WorkspaceLock:
    """Exclusive, re-entrant (per process) lock on a workspace; released on exit or process death."""

    def __init__(self, workspace: Workspace):
        self.path = workspace.lock_file
        workspace.root.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> WorkspaceLock:
        with _held_guard:
            if self.path in _held:
                fd, depth = _held[self.path]
                _held[self.path] = (fd, depth + 1)
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                try:
                    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
                    holder = f" (pid {info.get('pid')} on {info.get('host')}, since {info.get('started')})"
                except (OSError, ValueError):
                    pass
                os.close(fd)
                raise WorkspaceLocked(
                    f"workspace {self.path.parent} is in use by another keye run{holder}. Wait for it to finish, "
                    "or use another --workspace; read-only commands (keye lineage, keye verify) work meanwhile."
                ) from None
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _held[self.path] = (fd, 1)
        return self

    def __exit__(self, *exc: object) -> None:
        with _held_guard:
            fd, depth = _held[self.path]
            if depth > 1:
                _held[self.path] = (fd, depth - 1)
                return
            del _held[self.path]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def holds_lock(workspace: Workspace) -> bool:
    return workspace.lock_file in _held
