"""SIGKILL a training process at a random step, re-run it: it resumes, and the final weights are bitwise equal to
an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_data import write_train_spec

from keye.model.checkpoint import read_state
from keye.train.checkpointing import list_checkpoints

ROOT = Path(__file__).resolve().parents[3]
STEPS = 8


def _spec(train_corpus: dict, out: Path, metrics: Path) -> Path:
    settings = {
        "name": "pretrain",
        "kind": "pretrain",
        "steps": STEPS,
        "lr": 2e-3,
        "warmup_steps": 2,
        "tokens_per_step": 500,
        "checkpoint_every": 2,
        "keep_last": 2,
        "seed": 3,
    }
    return write_train_spec(train_corpus, out, settings, metrics_file=str(metrics))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(spec: Path) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "keye.train.trainer", str(spec)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(train_corpus: dict, tmp_path: Path) -> None:
    ref_out = tmp_path / "ref"
    _run(_spec(train_corpus, ref_out, tmp_path / "ref.jsonl"))

    out = tmp_path / "killed"
    metrics = tmp_path / "killed.jsonl"
    spec = _spec(train_corpus, out, metrics)
    kill_after = random.Random().randint(
        3, STEPS - 2
    )  # a random step; logged before its checkpoint is written
    proc = subprocess.Popen(
        [sys.executable, "-m", "keye.train.trainer", str(spec)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = metrics.read_text().count("\n") if metrics.exists() else 0
        if done >= kill_after or proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    saved = [s for s, _ in list_checkpoints(out)]
    assert len(saved) <= 2 and all(s < STEPS for s in saved)

    lines = _run(spec)
    done = lines[-1]
    assert done["done"] and done["steps"] == STEPS
    assert done["resumed_from_step"] == (saved[-1] if saved else None)
    assert saved, f"killed after {kill_after} steps but no checkpoint was written"

    a, b = read_state(ref_out / "final"), read_state(out / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed after step {kill_after})"
    ref_loss = [json.loads(x)["lm_loss"] for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    got = {json.loads(x)["step"]: json.loads(x)["lm_loss"] for x in metrics.read_text().splitlines()}
    assert [got[s] for s in range(1, STEPS + 1)] == ref_loss  # resumed steps re-logged with identical losses

    again = _run(spec)[-1]  # a finished stage returns at once
    assert again["resumed_from_step"] == STEPS
