"""Atomic file writes: a reader sees either the old file, the complete new file, or nothing.

Every artifact of the pipeline (shards, clips, checkpoints, reports, JSON indexes, whole directories: `atomic_dir`)
goes through here, so a crash
or SIGKILL at any moment never leaves a half-written file under its final name and a re-run can trust what exists.
Recipe: write to a unique temp name in the same directory (same filesystem, so the rename is atomic), flush and
fsync the file, ``os.replace`` onto the final name, then fsync the directory so the rename itself is durable.
Temp names start with ``.`` and end with ``.tmp`` so globbing for the final names never picks them up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; platforms that cannot open directories (Windows) just skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name_for(final_path: str | os.PathLike[str]) -> Path:
    """A fresh hidden temp path beside ``final_path`` (unique per call, so concurrent writers never collide)."""
    final = Path(final_path)
    return final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write (by any means: a library, a subprocess); on success it becomes ``final_path``.

    The caller writes and closes the temp file inside the ``with`` block. On normal exit the temp is fsynced and
    renamed onto ``final_path`` (replacing any old file); on exception the temp is removed and ``final_path`` is
    untouched. Parent directories are created.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing was written to the temp file for {final}")
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under root (before a rename makes it visible)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``final_dir`` to fill; on success it is fsynced and renamed onto
    ``final_dir`` (replacing an old one), on exception removed, ``final_dir`` untouched. The temp name is fixed
    (``.<name>.build``), so the leftover of a killed run is cleared by the next one."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.build"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the final path."""
    final = Path(path)
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return final


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the final path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = True
) -> Path:
    """Serialise ``obj`` as UTF-8 JSON (sorted keys by default, so equal objects give equal bytes) atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files left by killed writers in ``directory`` (not recursive); returns what was removed.

    Only call this when no other writer is active in the directory (e.g. under the workspace lock).
    """
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
