"""Issue 16, finding 5: symlink loops and unreadable entries become rejected videos with a reason, from folders and
manifests alike (never a crash of the whole ingest, never a silent skip), and show in lineage and the summary."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from keye.core.config import IngestSettings, PathSource
from keye.core.lineage import Lineage, make_id
from keye.core.workspace import Workspace
from keye.stages import ingest as ing
from keye.stages.sources import list_sources


def _ingest(sources, ws_dir):
    """What the ingest flow does, without Prefect: list, hash, probe, record, summarise."""
    ws, s = Workspace.at(ws_dir), IngestSettings(min_duration=0.5)
    files = list_sources(sources, s, ws)
    unique, _ = ing.dedupe(ing.hash_files(files))
    store = Lineage(ws)
    vs = make_id("vs", "test")
    store.record_videos(ing.ingest_videos(unique, s), members_of=vs)
    return store, store.videoset_summary(vs)


def _loop(folder: Path) -> Path:
    a, b = folder / "loop_a.mp4", folder / "loop_b.mp4"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def test_symlink_loop_is_a_rejected_video_in_folders_and_manifests(tmp_path):
    from keye.datasets.synthetic import generate_dataset

    good = generate_dataset(tmp_path / "videos", n_videos=1, n_long=0, seed=1)[0]
    loop = _loop(tmp_path / "videos")
    (tmp_path / "videos" / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{good}\n{loop}\n")
    for name, src in (("folder", tmp_path / "videos"), ("manifest", manifest)):
        store, summary = _ingest([PathSource(path=str(src))], tmp_path / f"ws-{name}")
        rows = {Path(r["path"]).name: r for r in store.videos()}
        assert rows[Path(good).name]["status"] == "ok", name
        assert rows["loop_a.mp4"]["status"] == "rejected", (name, rows)
        assert "symlink loop" in rows["loop_a.mp4"]["reason"], (name, rows["loop_a.mp4"])
        assert any("symlink loop" in r for r in summary["rejections"]), (name, summary)
        if name == "folder":
            assert "broken symlink" in rows["dangling.mp4"]["reason"], rows["dangling.mp4"]


_UNREADABLE = """
import json, os, sys
from keye.core.config import IngestSettings, PathSource
from keye.stages import ingest as ing
from keye.stages.sources import list_sources
from keye.core.workspace import Workspace
root = sys.argv[1]
if os.geteuid() == 0:  # root reads everything: drop to an ordinary user (after the imports) so permissions apply
    os.setgid(65534)
    os.setuid(65534)
s = IngestSettings()
out = {}
for src in (root + "/videos", root + "/list.txt"):
    files = list_sources([PathSource(path=src)], s, Workspace.at(root + "/ws"))
    out[src] = {h.path.rsplit("/", 1)[-1]: h.error for h in ing.hash_files(files)}
print(json.dumps(out))
"""


def test_unreadable_entries_are_rejected_with_a_reason():
    import json

    root = Path(tempfile.mkdtemp(prefix="keye-unreadable-"))
    try:
        os.chmod(root, 0o755)
        (root / "videos" / "locked").mkdir(parents=True)
        secret = root / "videos" / "secret.mp4"
        secret.write_bytes(b"x" * 100)
        (root / "videos" / "locked" / "inner.mp4").write_bytes(b"y" * 100)
        os.chmod(secret, 0o000)
        os.chmod(root / "videos" / "locked", 0o000)
        (root / "list.txt").write_text(f"{secret}\n{root / 'videos' / 'locked' / 'inner.mp4'}\n")
        for p in (root / "videos", root / "list.txt"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
        r = subprocess.run(
            [sys.executable, "-c", _UNREADABLE, str(root)], capture_output=True, text=True, env=env
        )
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        folder, manifest = got[str(root / "videos")], got[str(root / "list.txt")]
        assert "permission denied" in (folder["secret.mp4"] or "").lower(), folder
        assert "permission denied" in (folder.get("locked") or "").lower(), folder
        assert "permission denied" in (manifest["secret.mp4"] or "").lower(), manifest
        assert "permission denied" in (manifest["inner.mp4"] or "").lower(), manifest
    finally:
        for dirpath, dirs, _ in os.walk(root):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o755)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
