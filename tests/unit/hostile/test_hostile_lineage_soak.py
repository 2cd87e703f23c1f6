"""Issue 16 soak: a real pipeline run (`keye run`: ingest, caption, shard of short synthetic videos) while a reader
thread queries lineage every 50 ms and a second process runs `keye lineage ID --json` over and over.

Passes when the run completes, no reader call fails (before the store exists "no lineage store" is the one
allowed answer), and every state a reader sees is consistent: one committed transaction at a time, so
- every shard row has exactly n_samples member rows and is a member of its shardset;
- every clip belongs to a recorded video and every caption to a recorded clip;
- a complete artifact has its completion time, and a completed run its end time;
- counts never go backwards between two reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]

CHECKS = {
    "shard members != n_samples": """SELECT count(*) FROM shards s LEFT JOIN
        (SELECT shard_id, count(*) AS n FROM shard_members GROUP BY shard_id) m USING (shard_id)
        WHERE coalesce(m.n, 0) <> s.n_samples""",
    "shard not in its shardset": """SELECT count(*) FROM shards s WHERE s.shard_id NOT IN
        (SELECT member_id FROM set_members WHERE set_id = s.shardset_id)""",
    "clip without video": "SELECT count(*) FROM clips WHERE video_id NOT IN (SELECT video_id FROM videos)",
    "caption without clip": "SELECT count(*) FROM captions WHERE clip_id NOT IN (SELECT clip_id FROM clips)",
    "complete artifact without time": """SELECT count(*) FROM artifacts
        WHERE status = 'complete' AND completed_at IS NULL""",
    "finished run without end": "SELECT count(*) FROM runs WHERE status <> 'running' AND ended_at IS NULL",
}
COUNTS = ("videos", "clips", "captions", "shards", "shard_members")

LINEAGE_LOOP = """
import json, subprocess, sys, time, os
from keye.core.lineage import Lineage, LineageError
ws, stop = sys.argv[1], sys.argv[2]
stats = {"calls": 0, "ok": 0, "not_yet": 0, "bad": []}
while not os.path.exists(stop):
    try:  # something to ask about: a shard once there is one, else a video
        store = Lineage(ws, read_only=True)
        ref = store.scalar("SELECT shard_id FROM shards LIMIT 1") or store.scalar("SELECT video_id FROM videos LIMIT 1")
    except LineageError:
        ref = None
    if ref is None:
        time.sleep(0.2)
        continue
    r = subprocess.run([sys.executable, "-m", "keye.cli", "lineage", ref, "--workspace", ws, "--json"],
                       capture_output=True, text=True)
    stats["calls"] += 1
    try:
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["node"]["id"] == ref
        stats["ok"] += 1
    except Exception as e:
        stats["bad"].append(f"rc={r.returncode} {e!s:.500} {r.stderr[-500:]}")
print(json.dumps(stats))
"""


def _reader(ws: Path, stop: threading.Event, stats: dict) -> None:
    from keye.core.lineage import Lineage, LineageError

    last = dict.fromkeys(COUNTS, 0)
    while not stop.is_set():
        stats["calls"] += 1
        try:
            store = Lineage(ws, read_only=True)
            with store.pinned():
                for name, sql in CHECKS.items():
                    if store.scalar(sql):
                        stats["inconsistent"].append(name)
                now = {t: store.scalar(f"SELECT count(*) FROM {t}") for t in COUNTS}
            if any(now[t] < last[t] for t in COUNTS):
                stats["inconsistent"].append(f"counts went back: {last} -> {now}")
            last = now
            stats["states"].add(tuple(now.values()))
        except LineageError as e:
            if "no lineage store" in str(e):
                stats["not_yet"] += 1
            else:
                stats["errors"].append(str(e))
        except Exception as e:  # any other failure of a reader call is a finding
            stats["errors"].append(f"{type(e).__name__}: {e}")
        time.sleep(0.05)


def test_pipeline_completes_under_concurrent_lineage_readers(tmp_path):
    ws = tmp_path / "ws"
    cfg = tmp_path / "soak.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            name: soak
            workspace: {ws}
            stages: [ingest, caption, shard]
            sources:
              - synthetic: {{n_videos: 4, n_long: 0, seed: 5}}
            ingest: {{max_clip_seconds: 3, min_clip_seconds: 1, batch_size: 1}}
            caption: {{batch_size: 2}}
            shard: {{target_bytes: 20000, max_side: 112, fps: 4, batch_size: 2}}
            runner: {{kind: thread, max_workers: 2}}
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    stats = {"calls": 0, "not_yet": 0, "errors": [], "inconsistent": [], "states": set()}
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(ws, stop, stats), daemon=True)
    reader.start()
    stop_file = tmp_path / "stop"
    cli_loop = subprocess.Popen(
        [sys.executable, "-c", LINEAGE_LOOP, str(ws), str(stop_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "keye.cli", "run", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    run_s = time.monotonic() - t0
    stop_file.write_text("")
    out, err = cli_loop.communicate(timeout=300)
    stop.set()
    reader.join(timeout=60)
    assert run.returncode == 0, run.stderr[-4000:]
    cli = json.loads(out.strip().splitlines()[-1])
    print(
        f"run {run_s:.0f}s; reader thread: {stats['calls']} calls, {len(stats['states'])} distinct states, "
        f"{stats['not_yet']} before the store existed; keye lineage --json: {cli['calls']} calls, {cli['ok']} ok"
    )
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["inconsistent"] == [], stats["inconsistent"][:5]
    assert cli["bad"] == [], cli["bad"][:3] + [err[-2000:]]
    assert cli["ok"] >= 2, (cli, err[-2000:])
    assert len(stats["states"]) >= 5, stats["states"]  # the reader saw the run progress, not only its end
    final = max(stats["states"])
    assert final[COUNTS.index("shards")] >= 2
