"""One content hash for a checkpoint directory (every file's name and bytes), used by lineage and `keye verify`."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hash_checkpoint_dir(path: str | Path) -> str:
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
