"""Sources: folders, globs, manifests (.txt/.jsonl/.csv), fsspec URLs (copied into the workspace cache)."""

import json

import fsspec
import pytest

from keye.core.config import IngestSettings, PathSource
from keye.core.workspace import Workspace
from keye.stages.sources import SourceError, list_path_source, list_sources


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.MKV", "notes.txt", "sub/c.webm"):
        (root / name).write_bytes(name.encode() * 10)
    return root


def _names(refs):
    return sorted(r.path.rsplit("/", 1)[-1] for r in refs)


def test_folder_glob_and_manifests(tree, tmp_path):
    ws, s = Workspace.at(tmp_path / "ws"), IngestSettings()
    assert _names(list_path_source(PathSource(path=str(tree)), s, ws)) == ["a.mp4", "b.MKV", "c.webm"]
    assert _names(list_path_source(PathSource(path=str(tree), recursive=False), s, ws)) == ["a.mp4", "b.MKV"]
    assert _names(list_path_source(PathSource(path=f"{tree}/**/*.webm"), s, ws)) == ["c.webm"]
    (tmp_path / "m.txt").write_text(f"# comment\n{tree}/a.mp4\nvideos/sub/c.webm\n")
    assert _names(list_path_source(PathSource(path=str(tmp_path / "m.txt")), s, ws)) == ["a.mp4", "c.webm"]
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(tree / "b.MKV")}) + "\n")
    assert _names(list_path_source(PathSource(path=str(tmp_path / "m.jsonl")), s, ws)) == ["b.MKV"]
    (tmp_path / "m.csv").write_text(f"path,label\n{tree}/a.mp4,x\n{tree}/missing.mp4,y\n")
    refs = list_path_source(PathSource(path=str(tmp_path / "m.csv")), s, ws)
    assert (
        _names(refs) == ["a.mp4", "missing.mp4"] and [r.size for r in refs][1] == -1
    )  # kept, rejected later


def test_bad_sources_fail_clearly(tmp_path):
    ws, s = Workspace.at(tmp_path / "ws"), IngestSettings()
    with pytest.raises(SourceError, match="does not exist"):
        list_path_source(PathSource(path=str(tmp_path / "nowhere")), s, ws)
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(SourceError, match="bad.jsonl:1"):
        list_path_source(PathSource(path=str(tmp_path / "bad.jsonl")), s, ws)
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(SourceError, match="'path' column"):
        list_path_source(PathSource(path=str(tmp_path / "bad.csv")), s, ws)


def test_fsspec_url_is_fetched_once_into_the_cache(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/clips/x.mp4", b"remote video bytes")
    fs.pipe("/bucket/clips/readme.md", b"not a video")
    ws, s = Workspace.at(tmp_path / "ws"), IngestSettings()
    refs = list_sources([PathSource(path="memory://bucket/clips")], s, ws)
    assert len(refs) == 1 and refs[0].path.startswith(str(ws.cache))
    assert open(refs[0].path, "rb").read() == b"remote video bytes"
    again = list_sources([PathSource(path="memory://bucket/clips")], s, ws)
    assert again[0].path == refs[0].path  # unchanged remote file: the cached copy, no second download
    fs.pipe("/bucket/clips/x.mp4", b"changed remote bytes")  # changed remote file: fetched again
    changed = list_sources([PathSource(path="memory://bucket/clips")], s, ws)
    assert open(changed[0].path, "rb").read() == b"changed remote bytes"
