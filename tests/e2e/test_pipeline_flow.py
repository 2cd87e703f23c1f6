"""The data pipeline for real: Prefect flow runs (test harness server), PyAV decode/encode, DuckDB lineage, MLflow.

Covers: bad inputs rejected with reasons while the run goes on; the same content under two paths is one video;
shards verified and walked back to their source videos; an idempotent re-run; a process SIGKILLed in the middle of
writing a shard leaves nothing partial and the re-run completes with the same shards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from fixtures.corrupt_videos import corrupt_examples

    from keye.datasets.synthetic import generate_dataset

    src = tmp_path_factory.mktemp("videos")
    paths = generate_dataset(src / "synthetic", n_videos=4, n_long=0, seed=3)
    bad = corrupt_examples(src / "bad")
    dup = src / "copies" / "same_as_first.mp4"
    dup.parent.mkdir()
    shutil.copy(paths[0], dup)
    return src, paths, bad, dup


def _config(tmp_path: Path, src: Path) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(
        textwrap.dedent(
            f"""
            name: flowtest
            workspace: {tmp_path / "ws"}
            stages: [ingest, caption, shard]
            sources:
              - path: {src}
            ingest: {{max_clip_seconds: 6, batch_size: 3}}
            shard: {{target_bytes: 40000, max_side: 112, fps: 5}}
            runner: {{kind: thread, max_workers: 2}}
            """
        )
    )
    return p


def _counts(ws: Path) -> dict[str, int]:
    from keye.core.lineage import Lineage

    store = Lineage(ws, read_only=True)
    return {
        t: store.scalar(f"SELECT count(*) FROM {t}")
        for t in (
            "videos",
            "video_paths",
            "clips",
            "captions",
            "shards",
            "shard_members",
            "edges",
            "set_members",
        )
    }


def test_pipeline_end_to_end_rerun_and_kill(harness, sources, tmp_path):
    from flows.pipeline import pipeline
    from keye.core.lineage import Lineage
    from keye.data.shards import read_shard
    from keye.verify import verify_workspace

    src, videos, bad, dup = sources
    cfg = _config(tmp_path, src)
    ws = tmp_path / "ws"
    summary = pipeline(config_path=str(cfg))

    store = Lineage(ws, read_only=True)
    by_id = {r["video_id"]: r for r in store.videos()}
    rows = {p["path"]: by_id[p["video_id"]] for p in store.query("SELECT * FROM video_paths")}
    # every bad input is rejected with a reason a person understands; the good ones are ok
    for kind, path in bad.items():
        row = rows[str(path.resolve())]
        assert row["status"] == "rejected" and row["reason"], (kind, row)
    assert "0 bytes" in rows[str(bad["zero_bytes"].resolve())]["reason"]
    assert "no video stream" in rows[str(bad["audio_only"].resolve())]["reason"].lower()
    assert "short" in rows[str(bad["too_short"].resolve())]["reason"].lower()
    for v in videos:
        assert rows[str(Path(v).resolve())]["status"] == "ok"
    # same content under two paths: one video, both paths recorded
    first_id = rows[str(Path(videos[0]).resolve())]["video_id"]
    paths = store.query("SELECT path FROM video_paths WHERE video_id = ?", [first_id])
    assert {p["path"] for p in paths} == {str(Path(videos[0]).resolve()), str(dup.resolve())}
    assert summary["videos_ok"] == len(videos) and summary["videos_rejected"] == len(bad)
    assert (
        summary["shards"] >= 2 and summary["shard_samples"] == summary["clips"] == summary["captions_ok"]
    ), summary

    # shards: verified, readable, every member traceable to a source video
    assert verify_workspace(ws).problems == []
    shard = store.shards()[0]
    keys = [k for k, _, meta in read_shard(shard["path"]) if meta["video_id"]]
    assert keys and all("." not in k for k in keys)
    up = {r["kind"] for r in store.upstream(shard["path"])}
    assert {"clip", "caption", "video"} <= up
    down = {r["kind"] for r in store.downstream(first_id)}
    assert {"clip", "shard", "shardset"} <= down

    # MLflow: one parent run, one nested run per stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("keye")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stages = sorted(r.data.tags.get("keye.stage") for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert len(parents) == 1 and stages == ["caption", "ingest", "shard"]
    assert all(r.data.tags.get("keye.prefect_flow_run_id") for r in runs)

    # idempotent re-run: same artifacts, no new rows, no new shards
    before = _counts(ws)
    tars = sorted(p.name for p in ws.rglob("*.tar"))
    again = pipeline(config_path=str(cfg))
    assert again["artifacts"] == summary["artifacts"]
    after = _counts(ws)
    assert {k: v for k, v in after.items() if k != "edges"} == {
        k: v for k, v in before.items() if k != "edges"
    }
    assert sorted(p.name for p in ws.rglob("*.tar")) == tars

    # SIGKILL in the middle of writing a shard: nothing partial, the re-run completes with identical shards
    shard_dir = Path(store.shards()[0]["path"]).parent
    expected = {p.name: p.read_bytes() for p in shard_dir.glob("*.tar")}
    for p in shard_dir.glob("*.tar"):
        p.unlink()
    with __import__("duckdb").connect(
        str(ws / "lineage.duckdb")
    ) as con:  # forget the shards, as after a crash
        con.execute(
            "DELETE FROM shards; DELETE FROM shard_members; UPDATE artifacts SET status='building' "
            "WHERE kind='shardset'"
        )
    killer = tmp_path / "kill_mid_shard.py"
    killer.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            import keye.data.shards as shards
            real = shards._stream_tar
            def dying(samples, sink):
                sink.write(b"x" * 4096)  # part of a tar is on disk under the temp name...
                os.kill(os.getpid(), signal.SIGKILL)  # ...when the process dies
            shards._stream_tar = dying
            from flows.pipeline import pipeline
            pipeline(config_path={str(cfg)!r}, stages=["shard"])
            """
        )
    )
    from prefect.settings import PREFECT_API_URL

    # the child talks to the harness's server (no server of its own that could outlive it)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [sys.executable, str(killer)],
            env=env,
            stdout=out,
            stderr=out,
            timeout=600,
            start_new_session=True,
        )
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert not list(shard_dir.glob("*.tar")), "a partial shard is visible under its final name"
    pipeline(config_path=str(cfg), stages=["shard"])
    assert {p.name: p.read_bytes() for p in shard_dir.glob("*.tar")} == expected
    assert not [p for p in shard_dir.iterdir() if p.suffix != ".tar"], "stale temp files were left behind"
    assert verify_workspace(ws).problems == []
