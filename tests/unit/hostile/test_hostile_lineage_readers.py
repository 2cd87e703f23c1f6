"""Issue 16, finding 1: readers of lineage never make the writer fail, and never see a half-written state.

A writer process records shards (one transaction each: the shard row, its members and set membership) while a
reader process opens lineage read-only as fast as it can (as `keye lineage --json` does). Before the fix the
writer's open failed with DuckDB's "Conflicting lock is held" and the run died."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

WRITER = """
import sys, time
from keye.core.lineage import Lineage
from keye.core.workspace import Workspace, WorkspaceLock
ws = Workspace.at(sys.argv[1])
n = int(sys.argv[2])
with WorkspaceLock(ws):  # as a pipeline run: the orchestrator holds the lock and writes
    store = Lineage(ws)
    store.begin_artifact("ss1", "shardset", "shards", "h", [])
    for i in range(n):
        members = [{"key": f"k{i}-{j}", "clip_id": f"c{i}-{j}"} for j in range(1 + i % 5)]
        shard = {"shard_id": f"s{i:04d}", "path": f"/x/{i}.tar", "sha256": "0" * 64, "n_samples": len(members),
                 "bytes": 1}
        store.record_shard("ss1", shard, members)
    store.complete_artifact("ss1")
print("WRITER DONE", flush=True)
"""

READER = """
import json, sys, time
from keye.core.lineage import Lineage, LineageError
ws, stop = sys.argv[1], sys.argv[2]
import os
calls = errors = inconsistent = 0
seen = []
while not os.path.exists(stop):
    calls += 1
    try:
        store = Lineage(ws, read_only=True)
        with store.pinned():
            bad = store.query(
                '''SELECT s.shard_id FROM shards s
                   LEFT JOIN (SELECT shard_id, count(*) AS n FROM shard_members GROUP BY shard_id) m USING (shard_id)
                   WHERE coalesce(m.n, 0) <> s.n_samples
                      OR s.shard_id NOT IN (SELECT member_id FROM set_members WHERE set_id = s.shardset_id)''')
            inconsistent += len(bad)
            seen.append(store.scalar("SELECT count(*) FROM shards"))
    except LineageError as e:
        errors += 1
        print("READER ERROR", e, file=sys.stderr, flush=True)
print(json.dumps({"calls": calls, "errors": errors, "inconsistent": inconsistent, "max_seen": max(seen or [0]),
                  "monotonic": seen == sorted(seen)}))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_readers_never_crash_the_writer_nor_see_half_writes(tmp_path):
    ws = tmp_path / "ws"
    from keye.core.lineage import Lineage

    Lineage(ws)  # the store exists before the run, as for a second run on a workspace
    stop = tmp_path / "stop"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(ws), str(stop)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(2.0)  # readers are hammering before the writer starts
    n = 40
    t0 = time.perf_counter()
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, str(ws), str(n)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    write_s = time.perf_counter() - t0
    stop.write_text("")
    outs = [r.communicate(timeout=120) for r in readers]
    assert writer.returncode == 0 and "WRITER DONE" in writer.stdout, writer.stderr[-3000:]
    for out, err in outs:
        stats = json.loads(out.strip().splitlines()[-1])
        print(f"writer {write_s:.1f}s for {n} shard transactions; reader {stats}")
        assert stats["errors"] == 0, err[-2000:]
        assert stats["inconsistent"] == 0 and stats["monotonic"], stats
        assert stats["calls"] > 20, stats
    assert Lineage(ws, read_only=True).scalar("SELECT count(*) FROM shards") == n


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)  # e.g. the duckdb CLI or an older keye reading the live file
print("HOLDING", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def test_writer_waits_for_a_live_file_reader_then_says_who_blocks(tmp_path, monkeypatch):
    from keye.core.lineage import Lineage, LineageError

    ws = tmp_path / "ws"
    store = Lineage(ws)
    db = str(ws / "lineage.duckdb")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db, "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "HOLDING"
    t0 = time.monotonic()
    store.add_edges([("a", "b", "input_of")])  # waits out the reader (bounded), then writes
    assert time.monotonic() - t0 > 0.5
    holder.wait(timeout=30)
    assert Lineage(ws, read_only=True).scalar("SELECT count(*) FROM edges") == 1

    monkeypatch.setenv("KEYE_LINEAGE_WRITE_WAIT_S", "0.5")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db, "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        try:
            store.add_edges([("a", "c", "input_of")])
            raise AssertionError("the write should have given up after the bounded wait")
        except LineageError as e:
            assert "stayed locked by another process" in str(e) and "keye lineage" in str(e)
    finally:
        holder.kill()
        holder.wait()
