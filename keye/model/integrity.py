"""Per-file sha256 of a checkpoint directory, recorded when it is written and checked before it is read.

A checkpoint travels between people, disks and machines; one flipped bit in a weight file still parses and would be
trained on or evaluated silently, and a flipped header byte makes the safetensors parser fail without naming the
file. So every writer records `checksums.json` ({relative path: sha256} of every file it wrote) and every reader
checks the files it is about to use against it, refusing with the file's name. Plain stdlib: keye.model stays free
of pipeline imports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

CHECKSUMS = "checksums.json"
FORMAT = "keye.checksums/v1"
# Written after the record: meta.json marks a step checkpoint complete, so it cannot be in the record itself.
UNRECORDED = {CHECKSUMS, "meta.json"}


class CheckpointIntegrityError(ValueError):
    """A checkpoint file that does not match what was recorded when it was written (or has no record)."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not (p.parent == root and p.name in UNRECORDED) and p.name != CHECKSUMS
    )


def _write(root: Path, files: dict[str, str]) -> None:
    tmp = root / f".{CHECKSUMS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / CHECKSUMS)


def write_checksums(root: str | Path) -> dict[str, str]:
    """Record every file under `root` (sub-directories included; meta.json and the record itself excepted)."""
    root = Path(root)
    files = {rel: sha256_file(root / rel) for rel in _files(root)}
    _write(root, files)
    return files


def add_checksums(root: str | Path, names: Iterable[str]) -> None:
    """Add files written after the record (e.g. the tokenizer bundled beside the weights); the files already
    recorded are not re-hashed, so a corruption that happened in between is not blessed."""
    root = Path(root)
    files = recorded(root)
    for rel in names:
        files[str(rel)] = sha256_file(root / rel)
    _write(root, files)


def recorded(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} as written; refuses a directory without a readable record."""
    path = Path(root) / CHECKSUMS
    if not path.is_file():
        raise CheckpointIntegrityError(
            f"{path}: missing, so the checkpoint's files cannot be checked (written by an older keye or copied "
            f"incompletely); if you trust the files, record them with `python -m keye.model.integrity seal "
            f"{Path(root)}`"
        )
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointIntegrityError(f"{path}: unreadable checksum record ({e})") from None
    return {str(k): str(v) for k, v in files.items()}


def problems(root: str | Path, only: Iterable[str] | None = None) -> list[str]:
    """One line per file that is missing, changed, or an unrecorded weight file; [] when all match (files added
    beside the weights later, e.g. a tokenizer, are not recorded and not reported).
    `only` restricts the check to those relative paths (a reader checks what it is about to read)."""
    root = Path(root)
    try:
        files = recorded(root)
    except CheckpointIntegrityError as e:
        return [str(e)]
    out = []
    wanted = files if only is None else {str(r): files.get(str(r)) for r in only}
    for rel, digest in sorted(wanted.items()):
        p = root / rel
        if digest is None:
            out.append(f"{p}: not in {root / CHECKSUMS} (a file added after the checkpoint was written)")
        elif not p.is_file():
            out.append(f"{p}: missing (recorded in {CHECKSUMS})")
        elif sha256_file(p) != digest:
            out.append(
                f"{p}: sha256 does not match the one recorded when it was written (the file is corrupted)"
            )
    if only is None:
        extra = [rel for rel in _files(root) if rel not in files and rel.endswith(".safetensors")]
        out += [
            f"{root / rel}: not in {root / CHECKSUMS} (a file added after the checkpoint was written)"
            for rel in extra
        ]
    return out


def verify(root: str | Path, only: Iterable[str] | None = None) -> None:
    """Raise CheckpointIntegrityError naming the first bad file (and how many more there are)."""
    bad = problems(root, only)
    if bad:
        more = f" (and {len(bad) - 1} more problem(s); `keye verify` lists them)" if len(bad) > 1 else ""
        raise CheckpointIntegrityError(f"refusing checkpoint file {bad[0]}{more}")


if (
    __name__ == "__main__"
):  # pragma: no cover - a maintenance command for checkpoints written before the record
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "seal":
        sys.exit("usage: python -m keye.model.integrity seal CHECKPOINT_DIR")
    print(f"recorded {len(write_checksums(sys.argv[2]))} files in {Path(sys.argv[2]) / CHECKSUMS}")
