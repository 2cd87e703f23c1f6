"""keye.core.atomic: the final name only ever holds complete content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keye.core.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
)


def test_writes_land_complete_and_replace(tmp_path: Path) -> None:
    p = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_text(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    j = atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5]})
    assert json.loads(j.read_text()) == {"a": [1.5], "b": 1}
    assert j.read_text().index('"a"') < j.read_text().index('"b"')  # sorted keys: stable bytes
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["a.bin", "a.json", "sub"]


def test_exception_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    final = tmp_path / "f.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        assert tmp.parent == final.parent and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        raise RuntimeError("crash")
    assert final.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_nothing_written_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "g"):
        pass
    assert not list(tmp_path.iterdir())


def test_remove_stale_temps_only_touches_temps(tmp_path: Path) -> None:
    (tmp_path / ".x.tar.123.abcd.tmp").write_bytes(b"partial")
    (tmp_path / "x.tar").write_bytes(b"done")
    (tmp_path / ".hidden").write_bytes(b"keep")
    removed = remove_stale_temps(tmp_path)
    assert [r.name for r in removed] == [".x.tar.123.abcd.tmp"]
    assert sorted(x.name for x in tmp_path.iterdir()) == [".hidden", "x.tar"]
