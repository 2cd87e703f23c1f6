"""Step checkpoints of a training stage: everything needed to continue bit for bit (model, optimizer, scheduler,
RNG states, loader cursor, step), written as one atomic directory, the newest N kept.

Layout of out_dir/step-000123/: model/ (keye.model checkpoint layout: config.json + safetensors), trainer.safetensors
(rank 0: scheduler, step, loader cursor per rank, extras), optim-rank{r}.safetensors and rng-rank{r}.safetensors
(per rank: optimizer state may be sharded under FSDP2; RNG streams differ per rank), checksums.json (sha256 of every
file, checked before each file is read), meta.json written last. The state files are safetensors + a JSON skeleton
(keye.train.state_io): nothing in a checkpoint is unpickled, so reading one cannot run code. The whole directory is
built under a hidden temp name, fsynced and renamed, as torchtitan/DCP checkpoints are committed; a directory
without meta.json is never read.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keye.core.atomic import _fsync_dir, fsync_tree
from keye.model import integrity
from keye.train.state_io import load_state_file, save_state_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")
META = "meta.json"


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints (meta.json present), oldest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> tuple[int, Path] | None:
    ck = list_checkpoints(out_dir)
    return ck[-1] if ck else None


def rng_state() -> dict[str, Any]:
    """NumPy and torch streams. Not Python's global `random`: training never draws from it, while Prefect and
    MLflow threads in the same process do, at times of their own, so saving it made step checkpoints differ
    between identical runs (issue 24)."""
    state: dict[str, Any] = {
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:  # checkpoints written before issue 24
        random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_dir_for(out_dir: Path, step: int) -> Path:
    """The hidden staging directory of a step checkpoint (shared by all ranks; removed before a fresh write)."""
    return Path(out_dir) / f".step-{step:06d}.tmp"


def write_rank_files(tmp: Path, rank: int, optimizer_state: dict[str, Any]) -> None:
    """Per-rank pieces: optimizer state and RNG streams."""
    tmp.mkdir(parents=True, exist_ok=True)
    save_state_file(optimizer_state, tmp / f"optim-rank{rank}.safetensors")
    save_state_file(rng_state(), tmp / f"rng-rank{rank}.safetensors")


def commit(
    tmp: Path, final: Path, trainer_state: dict[str, Any], meta: dict[str, Any], keep_last: int
) -> Path:
    """Rank 0, after every rank wrote its files: trainer state, meta last, fsync, rename, prune old steps."""
    save_state_file(trainer_state, tmp / "trainer.safetensors")
    integrity.write_checksums(tmp)  # every rank's files are in place: record them all, then mark complete
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    fsync_tree(tmp)
    if final.exists():  # a stale copy of the same step (re-run after a crash past the rename): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(final.parent, keep_last)
    return final


def prune(out_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete step checkpoints; drop stale temp directories of older steps."""
    ck = list_checkpoints(out_dir)
    for _, p in ck[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    newest = ck[-1][0] if ck else -1
    for p in Path(out_dir).glob(".step-*.tmp"):
        m = re.match(r"^\.step-(\d+)\.tmp$", p.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)


def _read_checked(ckpt: Path, name: str) -> Any:
    if not (ckpt / name).is_file():
        return load_state_file(ckpt / name)  # raises: missing, or an old pickle layout (named, never loaded)
    integrity.verify(ckpt, only=[name])
    return load_state_file(ckpt / name)


def read_rank_files(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state, RNG state) of one rank, each file checked against the recorded sha256 first."""
    optim = _read_checked(ckpt, f"optim-rank{rank}.safetensors")
    rng = _read_checked(ckpt, f"rng-rank{rank}.safetensors")
    return optim, rng


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return _read_checked(ckpt, "trainer.safetensors")
