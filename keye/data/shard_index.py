"""Reading shard records by random access into the tars: member offsets from the tar headers, the WebDataset key
(the file name up to the first dot), only the JSON members read; what packing and the loader need before decoding."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ShardIndex:
    """Where each sample's members live inside one tar (offset, size), for random access."""

    path: str
    members: dict[str, dict[str, tuple[int, int]]]  # key -> ext -> (data offset, size)

    def read(self, key: str, ext: str, fh: Any | None = None) -> bytes | None:
        loc = self.members.get(key, {}).get(ext)
        if loc is None:
            return None
        if fh is None:
            with open(self.path, "rb") as f:
                f.seek(loc[0])
                return f.read(loc[1])
        fh.seek(loc[0])
        return fh.read(loc[1])

    def open(self, key: str, ext: str) -> MemberReader | None:
        """A seekable read-only file over one member, without reading it into memory (long videos)."""
        loc = self.members.get(key, {}).get(ext)
        return None if loc is None else MemberReader(self.path, *loc)


class MemberReader(io.RawIOBase):
    """Read-only, seekable view of the byte range [offset, offset+size) of a file (a tar member)."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb")  # closed by close()
        self._off, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._off + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got or 0
        return got or 0

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def index_shard(path: str | os.PathLike[str]) -> ShardIndex:
    """Scan a tar's headers once (no member data is read)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            key, _, ext = Path(m.name).name.partition(".")
            members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return ShardIndex(str(path), members)


@dataclass
class ShardScan:
    """The records of a shard (json only) and the samples that cannot be used, with reasons."""

    records: list[tuple[str, dict[str, Any]]]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def scan_shard(path: str | os.PathLike[str]) -> ShardScan:
    """Read every <key>.json of a shard (for the pack stage); a key without json or mp4, or with unparsable json,
    is reported in `bad` and skipped."""
    idx = index_shard(path)
    out = ShardScan(records=[])
    with open(idx.path, "rb") as fh:
        for key in sorted(idx.members):
            parts = idx.members[key]
            if "json" not in parts:
                out.bad.append((key, "missing json"))
                continue
            if "mp4" not in parts:
                out.bad.append((key, "missing mp4"))
                continue
            try:
                rec = json.loads(idx.read(key, "json", fh) or b"")
            except (ValueError, UnicodeDecodeError) as e:
                out.bad.append((key, f"unparsable json: {e}"))
                continue
            if not isinstance(rec, dict):
                out.bad.append((key, "json is not an object"))
                continue
            lacking = [f for f in ("duration", "width", "height") if not isinstance(rec.get(f), int | float)]
            if lacking:
                out.bad.append((key, f"json lacks numeric {lacking}"))
                continue
            rec.setdefault("key", key)
            out.records.append((key, rec))
    return out
