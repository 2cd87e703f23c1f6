"""The `keye` command's contract: clear errors and exit codes, verify catches a changed shard, lineage walks."""

import json

from typer.testing import CliRunner

from keye.cli import app
from keye.core.lineage import Lineage, clip_id_for, video_id_for
from keye.data.shards import write_shard

runner = CliRunner()


def test_bad_config_fails_before_work_with_field_path(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"workspace: {tmp_path / 'ws'}\ningest:\n  max_clip_seconds: -3\n")
    res = runner.invoke(app, ["run", str(p)])
    assert res.exit_code == 2
    assert "ingest.max_clip_seconds" in res.output
    assert not (tmp_path / "ws").exists()  # nothing was started


def _workspace_with_a_shard(tmp_path):
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    info = write_shard(tmp_path / "shards", "shard-000000", [("c0", mp4, {"key": "c0"})])
    store = Lineage(tmp_path / "ws")
    vid = video_id_for("ab" * 32, "/src/a.mp4")
    store.record_videos(
        [{"video_id": vid, "path": "/src/a.mp4", "sha256": "ab" * 32, "status": "ok", "clips": [(0.0, 2.0)]}]
    )
    clip = clip_id_for(vid, 0.0, 2.0)
    store.record_shard(
        "ss1",
        {
            "shard_id": "s1",
            "path": str(info.path),
            "sha256": info.sha256,
            "n_samples": 1,
            "bytes": info.bytes,
        },
        [{"key": "c0", "clip_id": clip}],
    )
    return info.path, vid


def test_verify_and_lineage(tmp_path):
    shard, vid = _workspace_with_a_shard(tmp_path)
    ws = str(tmp_path / "ws")
    ok = runner.invoke(app, ["verify", "--workspace", ws])
    assert ok.exit_code == 0, ok.output
    assert "0 problem(s)" in ok.output

    res = runner.invoke(app, ["lineage", str(shard), "--workspace", ws, "--json"])
    assert res.exit_code == 0, res.output
    walk = json.loads(res.output)
    assert walk["node"]["kind"] == "shard" and vid in {r["id"] for r in walk["upstream"]}
    res = runner.invoke(app, ["lineage", vid, "--workspace", ws])
    assert res.exit_code == 0 and "s1" in res.output

    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # one flipped byte inside a member
    shard.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", "--workspace", ws])
    assert bad.exit_code == 1 and "MISMATCH" in bad.output

    missing = runner.invoke(app, ["lineage", "nothing-like-this", "--workspace", ws])
    assert missing.exit_code == 2 and "not a known artifact" in missing.output
