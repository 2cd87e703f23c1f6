"""Two CPU processes (torch.distributed, gloo) train on the same global batch as one process: same losses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_data import write_train_spec

from keye.data.packing import read_pack_index
from keye.model.checkpoint import read_state
from keye.train.checkpointing import read_trainer_state

ROOT = Path(__file__).resolve().parents[3]
STEPS = 3


def _spec(train_corpus: dict, out: Path, tokens_per_step: int) -> Path:
    settings = {
        "name": "pretrain",
        "kind": "pretrain",
        "steps": STEPS,
        "lr": 2e-3,
        "tokens_per_step": tokens_per_step,
        "checkpoint_every": 100,
        "shuffle": False,
        "seed": 1,
    }
    return write_train_spec(train_corpus, out, settings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    if world > 1:
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    return env


def _launch(spec: Path, world: int) -> list[dict]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "keye.train.trainer", str(spec)],
            env=_env(r, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:  # generous: a shared CI machine may run these at a fraction of a core each
        outs = [p.communicate(timeout=900) for p in procs]
    finally:  # never leave ranks behind (a rank that failed leaves the others waiting in a collective)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(x) for x in outs[0][0].splitlines() if x.startswith('{"step"')]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(
    train_corpus: dict, tmp_path: Path
) -> None:
    idx = read_pack_index(train_corpus["pack_index"])
    n_packs = len(set(idx.column("pack_id").to_pylist()))
    mean_pack = sum(idx.column("tokens").to_pylist()) / n_packs
    tps = int(4 * mean_pack)  # one process: 4 packs per step; two ranks: 2 packs each (the same 4)

    one = _launch(_spec(train_corpus, tmp_path / "one", tps), 1)
    two = _launch(_spec(train_corpus, tmp_path / "two", tps), 2)
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert a["target_tokens"] == b["target_tokens"]
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    meta = json.loads((tmp_path / "two" / f"step-{STEPS:06d}" / "meta.json").read_text())
    assert meta["world_size"] == 2  # really two ranks, not two independent single runs
    loader_state = read_trainer_state(tmp_path / "two" / f"step-{STEPS:06d}")["loader"]
    assert [s["rank"] for s in loader_state] == [0, 1] and all(s["next"] == 2 * STEPS for s in loader_state)
    wa, wb = read_state(tmp_path / "one" / "final"), read_state(tmp_path / "two" / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
