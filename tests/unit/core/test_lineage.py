"""DuckDB lineage: schema, idempotent writes, dedupe by content, graph walks, one writer, read-only readers."""

import multiprocessing as mp

import pytest

from keye.core.lineage import Lineage, LineageError, clip_id_for, video_id_for
from keye.core.workspace import Workspace, WorkspaceLock, WorkspaceLocked


def _video(path, sha, status="ok", reason=None, clips=((0.0, 2.0), (2.0, 4.0))):
    return {
        "video_id": video_id_for(sha, path),
        "path": path,
        "sha256": sha,
        "status": status,
        "reason": reason,
        "duration": 4.0,
        "fps": 10.0,
        "width": 64,
        "height": 48,
        "codec": "h264",
        "clips": list(clips) if status == "ok" else [],
    }


def test_videos_table_contract_and_idempotence(tmp_path):
    store = Lineage(tmp_path)
    recs = [_video("/a.mp4", "aa" * 32), _video("/bad.mp4", "bb" * 32, "rejected", "empty file (0 bytes)")]
    store.record_videos(recs)
    store.record_videos(recs)  # re-run: nothing duplicated
    cols = {r["column_name"] for r in store.query("SELECT column_name FROM (DESCRIBE videos)")}
    assert {"path", "sha256", "status", "reason", "duration", "fps", "width", "height", "codec"} <= cols
    rows = store.videos()
    assert len(rows) == 2 and store.scalar("SELECT count(*) FROM clips") == 2
    bad = [r for r in rows if r["status"] == "rejected"][0]
    assert bad["reason"] == "empty file (0 bytes)"
    # status/reason consistency is enforced by the schema
    import duckdb

    with pytest.raises(duckdb.ConstraintException):
        store.record_videos([_video("/c.mp4", "cc" * 32, "ok", "should not have a reason")])


def test_same_content_two_paths_is_one_video(tmp_path):
    store = Lineage(tmp_path)
    store.record_videos([_video("/a.mp4", "aa" * 32)])
    store.add_video_paths([(video_id_for("aa" * 32, "/a.mp4"), "/copy/a.mp4")])
    assert store.scalar("SELECT count(*) FROM videos") == 1
    assert store.scalar("SELECT count(*) FROM video_paths") == 2
    assert store.resolve("/copy/a.mp4")["id"] == video_id_for("aa" * 32, "x")


def test_walk_from_shard_to_video_and_back(tmp_path):
    store = Lineage(tmp_path)
    v = _video("/a.mp4", "aa" * 32)
    store.record_videos([v])
    clip = clip_id_for(v["video_id"], 0.0, 2.0)
    store.record_captions(
        [{"caption_id": "k1", "clip_id": clip, "backend": "sidecar", "caption": "a red circle"}]
    )
    store.begin_artifact("ss1", "shardset", "shard", "h", ["cs1"])
    store.record_shard(
        "ss1",
        {"shard_id": "s1", "path": str(tmp_path / "s.tar"), "sha256": "0" * 64, "n_samples": 1, "bytes": 10},
        [{"key": "c1", "clip_id": clip, "caption_id": "k1"}],
    )
    store.complete_artifact("ss1")
    reader = Lineage(tmp_path, read_only=True)
    up = {r["id"]: r["kind"] for r in reader.upstream("s1")}
    assert up[v["video_id"]] == "video" and up[clip] == "clip" and up["k1"] == "caption"
    down = {r["id"] for r in reader.downstream(v["video_id"])}
    assert {"s1", "ss1", clip, "k1"} <= down
    assert reader.latest_artifact("shardset") == "ss1"
    with pytest.raises(LineageError, match="not a known artifact"):
        reader.resolve("nothing-like-this")


def _try_lock(root, q):
    try:
        with WorkspaceLock(Workspace.at(root)):
            q.put("acquired")
    except WorkspaceLocked as e:
        q.put(str(e))


def test_second_writer_gets_clear_error(tmp_path):
    ws = Workspace.at(tmp_path)
    with WorkspaceLock(ws):
        with WorkspaceLock(ws):  # re-entrant in the same process
            pass
        q = mp.get_context("spawn").Queue()
        p = mp.get_context("spawn").Process(target=_try_lock, args=(str(tmp_path), q))
        p.start()
        p.join(60)
        msg = q.get(timeout=5)
    assert "in use by another keye run" in msg and "pid" in msg
    p2 = mp.get_context("spawn").Process(target=_try_lock, args=(str(tmp_path), q))
    p2.start()
    p2.join(60)
    assert q.get(timeout=5) == "acquired"


def test_read_only_needs_existing_store(tmp_path):
    with pytest.raises(LineageError, match="no lineage store"):
        Lineage(tmp_path / "empty", read_only=True)


def test_the_newest_checkpoint_is_the_mainlines_not_a_branchs(tmp_path):
    """A stage run alone builds on the newest mainline checkpoint: an agent_rl checkpoint (a branch, made after the
    video_rl one) is not it."""
    import time

    store = Lineage(tmp_path)
    with pytest.raises(LineageError, match="run the train stage first"):
        store.latest_checkpoint_path()
    for i, stage in enumerate(("sft", "video_rl", "agent_rl")):
        store.record_checkpoint(f"ck{i}", str(tmp_path / stage / "final"), f"{i:064x}", stage, 1, None, [])
        time.sleep(1.05)  # created_at (to the second) orders them
    assert store.latest_checkpoint_path() == str(tmp_path / "video_rl" / "final")
