"""Readers of lineage never touch the file the run writes, so no reader can make a run fail.

DuckDB lets one process open a database file read-write, and a read-only opener holds a lock that makes the
writer's open fail ("Conflicting lock is held"); a user running `keye lineage` while a pipeline writes could kill
the run. So the writer publishes a snapshot after every committed write transaction: it checkpoints (the file then
holds every committed row, nothing in the WAL), copies the file beside itself under a temp name and renames the
copy onto `lineage.snapshot.duckdb`. Readers open the snapshot: they see the state after some complete
transaction, never a half-written one, and a rename never disturbs an open reader (it keeps the old inode).

Two bounded waits remain for processes that still open the live file (an older keye, the duckdb CLI, a workspace
whose snapshot is missing): the writer retries its open with backoff for up to KEYE_LINEAGE_WRITE_WAIT_S (60 s),
and such readers for up to KEYE_LINEAGE_READ_WAIT_S (10 s); then each says clearly who holds the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path

import duckdb

SNAPSHOT_SUFFIX = ".snapshot.duckdb"


class LineageBusy(RuntimeError):
    """The live lineage file stayed locked by another process for longer than the bounded wait."""


def snapshot_path(db: Path) -> Path:
    return db.with_name(db.stem + SNAPSHOT_SUFFIX)


def publish(db: Path) -> Path:
    """Copy the (checkpointed, closed) live file onto the snapshot atomically. No fsync: the snapshot is derived
    data, re-published by the next write; a reader that cannot open it falls back to the live file."""
    snap = snapshot_path(db)
    tmp = snap.with_name(f".{snap.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        shutil.copyfile(db, tmp)
        os.replace(tmp, snap)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return snap


def _wait_s(var: str, default: float) -> float:
    try:
        return float(os.environ.get(var, default))
    except ValueError:
        return default


def _is_lock_error(e: Exception) -> bool:
    return "lock" in str(e).lower()


def connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """duckdb.connect, retrying while another process holds a conflicting lock (10 ms doubling to 250 ms)."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as e:
            if not _is_lock_error(e) or time.monotonic() >= deadline:
                if _is_lock_error(e):
                    raise LineageBusy(
                        f"{path} stayed locked by another process for {wait_s:.0f} s ({e}). "
                        + (
                            "A run is writing it: retry in a moment, or wait for the run to finish."
                            if read_only
                            else "Close the program that opened it (read lineage with `keye lineage`, which "
                            "reads the snapshot and never blocks a run)."
                        )
                    ) from e
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def open_writer(db: Path) -> duckdb.DuckDBPyConnection:
    return connect(db, read_only=False, wait_s=_wait_s("KEYE_LINEAGE_WRITE_WAIT_S", 60.0))


def open_reader(db: Path) -> duckdb.DuckDBPyConnection:
    """The snapshot when there is one (never blocks the writer), else the live file with a bounded wait."""
    snap = snapshot_path(db)
    if snap.exists():
        try:
            return connect(snap, read_only=True, wait_s=_wait_s("KEYE_LINEAGE_READ_WAIT_S", 10.0))
        except duckdb.Error:
            pass  # a damaged snapshot (e.g. after a power loss): the live file is the truth
    return connect(db, read_only=True, wait_s=_wait_s("KEYE_LINEAGE_READ_WAIT_S", 10.0))
