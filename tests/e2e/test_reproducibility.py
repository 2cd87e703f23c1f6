"""Issue 24: the same commit, config and seed give the same bytes. The data stages run twice in two directories
and `keye verify --against` finds every artifact equal; training twice from the same pack gives byte-equal
checkpoints; a broken artifact is named by stage, id, both paths and both hashes; a BPE tokenizer does not
depend on the order of its texts; clips encoded in one process do not depend on what it encoded before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _verify(ours: Path, theirs: Path):
    from keye.cli import app

    return CliRunner().invoke(app, ["verify", "--workspace", str(ours), "--against", str(theirs)])


# ------------------------------------------------------------------------------------------- unit: verify --against
def _toy_workspace(root: Path) -> Path:
    """A workspace with lineage rows for a video, a clip and a caption, and one file in each file stage."""
    from keye.core.lineage import Lineage
    from keye.core.workspace import Workspace, WorkspaceLock

    ws = Workspace.at(root)
    with WorkspaceLock(ws):
        store = Lineage(ws)
        with store.transaction() as con:
            con.execute(
                "INSERT INTO videos (video_id, path, sha256, status, duration) VALUES (?, ?, ?, 'ok', 3.5)",
                ["v1", str(root / "videos" / "a.mp4"), "ab" * 32],
            )
            con.execute(
                "INSERT INTO clips (clip_id, video_id, idx, start_s, end_s) VALUES ('c1', 'v1', 0, 0, 2)"
            )
            con.execute(
                "INSERT INTO captions (caption_id, clip_id, backend, status, caption, record) "
                "VALUES ('k1', 'c1', 'sidecar', 'ok', 'a red circle', ?)",
                [json.dumps({"meta": {"source": str(root / "videos" / "a.json"), "latency_s": 0.5}})],
            )
    for rel, data in {
        "videos/a.mp4": b"video",
        "cache/clips/d/c1.mp4": b"clip",
        "shards/ss1/shard-000000.tar": b"tar" * 100,
        "tokenizers/t1/tokenizer.json": b"{}",
        "packs/ps1/packs.parquet": b"parquet",
        "checkpoints/final/model.safetensors": b"weights",
        "reports/e1/metrics.json": b'{"acc": 0.5}',
        "reports/e1/report.md": b"generation seconds: 12.3",  # human-readable, times: not compared
    }.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_verify_against_names_the_first_broken_artifact(tmp_path: Path) -> None:
    a = _toy_workspace(tmp_path / "a")
    b = _toy_workspace(tmp_path / "b")
    (b / "reports/e1/report.md").write_bytes(b"generation seconds: 99.9")
    res = _verify(a, b)
    assert res.exit_code == 0, res.output  # other dirs, other timings, same artifacts
    assert "shards       1 identical" in res.output and ": identical" in res.output

    # break one shard and a later pack: the shard is named, with both paths and both hashes
    shard_b = b / "shards/ss1/shard-000000.tar"
    shard_b.write_bytes(b"tar" * 99 + b"taR")
    (b / "packs/ps1/packs.parquet").write_bytes(b"other")
    res = _verify(a, b)
    assert res.exit_code == 1, res.output
    first = res.output.split("FIRST DIFFERENCE", 1)[1]
    assert "stage shards: file:shards/ss1/shard-000000.tar differs" in first
    assert str(a / "shards/ss1/shard-000000.tar") in first and str(shard_b) in first
    assert hashlib.sha256(shard_b.read_bytes()).hexdigest() in first
    assert hashlib.sha256(b"tar" * 100).hexdigest() in first
    assert "packs        1 of 1 differ" in res.output

    # a caption that differs in lineage (no file) is named by its id
    from keye.core.lineage import Lineage
    from keye.core.workspace import Workspace, WorkspaceLock

    with WorkspaceLock(Workspace.at(b)), Lineage(b).transaction() as con:
        con.execute("UPDATE captions SET caption = 'a blue circle' WHERE caption_id = 'k1'")
    res = _verify(a, b)
    assert res.exit_code == 1 and "stage captions: captions:k1 differs" in res.output, res.output

    # a stage that ran in one workspace only is said so, and a non-workspace is a clear error
    shutil.rmtree(b / "checkpoints")
    res = _verify(a, b)
    assert res.exit_code == 1
    assert (
        f"checkpoints  stage checkpoints: 1 artifact(s) in {a}, none in {b} (the stage did not run there)"
        in (res.output)
    )
    res = _verify(a, tmp_path / "nowhere")
    assert res.exit_code == 2 and "not a keye workspace" in res.output


# ------------------------------------------------------------------------------------------------- unit: sources
def test_bpe_does_not_depend_on_text_order() -> None:
    import random

    from keye.data.tokenizer import train_bpe

    rng = random.Random(0)
    words = ["red", "blue", "circle", "square", "moves", "left", "at", "seconds", "then", "appears"]
    texts = [
        " ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 99)}.5 seconds" for _ in range(300)
    ]
    ref = train_bpe(texts, vocab_size=400).to_json()
    for seed in range(3):
        shuffled = texts[:]
        random.Random(seed).shuffle(shuffled)
        assert train_bpe(shuffled, vocab_size=400).to_json() == ref


def test_clip_bytes_do_not_depend_on_what_the_process_encoded_before(tmp_path: Path) -> None:
    """x264's mbtree read uninitialised rows for a height not a multiple of 16 (here 84): the same clip encoded
    after another one came out different. Each encode here follows a different history."""
    from keye.data.shards import encode_clip
    from keye.datasets.synthetic import generate_dataset

    videos = generate_dataset(tmp_path / "src", n_videos=6, n_long=0, seed=0)
    jobs = [(videos[2], 3.833333), (videos[1], 3.0)] * 4  # the pair that gave 2 hashes for the first before
    seen: dict[str, set[str]] = {}
    for n, (video, end) in enumerate(jobs):
        out = tmp_path / f"o{n}.mp4"
        encode_clip(video, 0.0, end, out, max_side=112, fps=5, gop=1.0)
        seen.setdefault(str(video), set()).add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert all(len(h) == 1 for h in seen.values()), seen


# -------------------------------------------------------------------------------------- end to end: data stages
@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _data_config(root: Path) -> Path:
    p = root / "pipeline.yaml"
    root.mkdir(parents=True, exist_ok=True)
    p.write_text(
        textwrap.dedent(
            f"""
            name: repro
            workspace: {root / "ws"}
            seed: 0
            stages: [ingest, caption, shard, pack]
            sources:
              - {{kind: synthetic, n_videos: 4, n_long: 0, seed: 0, heldout_fraction: 0.25}}
            ingest: {{max_clip_seconds: 6, batch_size: 2}}
            shard: {{target_bytes: 40000, max_side: 112, fps: 5, batch_size: 2}}
            pack: {{max_tokens: 1024, tokenizer: {{path: null, vocab_size: 1024}}}}
            runner: {{kind: thread, max_workers: 2}}
            """
        )
    )
    return p


@pytest.mark.slow
def test_data_stages_twice_give_identical_artifacts(harness, tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    runs = [tmp_path / "first", tmp_path / "second dir"]  # other paths, one with a space
    for root in runs:
        pipeline(config_path=str(_data_config(root)))
    a, b = (r / "ws" for r in runs)
    res = _verify(a, b)
    assert res.exit_code == 0, res.output
    for stage, least in (
        ("videos", 8),
        ("clips", 4),
        ("captions", 4),
        ("shards", 2),
        ("tokenizer", 2),
        ("packs", 2),
    ):
        line = next(x for x in res.output.splitlines() if x.startswith(stage))
        assert line.endswith("identical") and int(line.split()[1]) >= least, line


# ------------------------------------------------------------------------------------------ end to end: training
def _train(train_corpus: dict, out: Path) -> None:
    from test_train_data import write_train_spec

    settings = {
        "name": "pretrain",
        "kind": "pretrain",
        "steps": 4,
        "lr": 2e-3,
        "warmup_steps": 1,
        "tokens_per_step": 500,
        "checkpoint_every": 2,
        "keep_last": 2,
        "seed": 5,
    }
    spec = write_train_spec(train_corpus, out, settings)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "keye.train.trainer", str(spec)],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_training_twice_from_the_same_pack_gives_byte_equal_checkpoints(
    train_corpus: dict, tmp_path: Path
) -> None:
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    for out in (a, b):
        out.parent.mkdir()
        _train(train_corpus, out)
    ta, tb = _tree(a), _tree(b)
    for name in (
        "model.safetensors",
        "trainer.safetensors",
        "optim-rank0.safetensors",
        "rng-rank0.safetensors",
    ):
        assert any(k.endswith(name) for k in ta), (name, sorted(ta))
    assert ta == tb  # final weights, step checkpoints' weights, optimizer, RNG and trainer state
