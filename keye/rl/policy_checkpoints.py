"""Step checkpoints, seeded data order and the final export shared by the RL training loops (video_rl, mopd,
agent_rl): one implementation of "resume bit for bit" for a single-process policy trainer.

A step directory holds the policy's weights (keye.model layout), the optimizer and RNG streams, and the trainer
state (step, data cursor, the scheduler when there is one, last metrics), written atomically with checksums by
keye.train.checkpointing; the data order is a seeded permutation per epoch, so the cursor alone restores it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from keye.core.atomic import atomic_dir
from keye.train import checkpointing as ckpt

T = TypeVar("T")


def seeded_take(items: Sequence[T], seed: int, position: int, n: int) -> list[T]:
    """n items from `position` in a seeded permutation of `items` per epoch (the position is the whole state)."""
    if not items:
        raise ValueError("the RL prompt / task set is empty")
    out = []
    for p in range(position, position + n):
        epoch, i = divmod(p, len(items))
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        out.append(items[int(order[i])])
    return out


def save_policy_step(
    model: Any, opt: Any, sched: Any, out_dir: Path, step: int, trainer: dict[str, Any], keep: int, stage: str
) -> None:
    """One step checkpoint (refused when a weight is not finite: it would be resumed forever)."""
    from keye.model.checkpoint import save_checkpoint

    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise FloatingPointError(f"[{stage}] weights are not finite at step {step}; checkpoint not written")
    tmp = ckpt.temp_dir_for(out_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.write_rank_files(tmp, 0, opt.state_dict())
    save_checkpoint(model, tmp / "model")
    state = {**trainer, "scheduler": sched.state_dict()} if sched is not None else dict(trainer)
    meta = {"step": step, "stage": stage, "kind": stage, "world_size": 1}
    ckpt.commit(tmp, ckpt.step_dir(out_dir, step), state, meta, keep)


def load_policy_step(model: Any, opt: Any, sched: Any, step_dir: Path) -> dict[str, Any]:
    """Weights, optimizer, scheduler and RNG streams from a step checkpoint; returns the trainer state."""
    from keye.model.checkpoint import read_state

    missing, unexpected = model.load_state_dict(read_state(step_dir / "model"), strict=False)
    tied = model.config.lm.tie_word_embeddings
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and tied)]
    if missing or unexpected:
        raise KeyError(f"step checkpoint {step_dir} does not match the model: {missing=} {unexpected=}")
    trainer = ckpt.read_trainer_state(step_dir)
    optim_state, rng = ckpt.read_rank_files(step_dir, 0)
    opt.load_state_dict(optim_state)
    if sched is not None:
        sched.load_state_dict(trainer["scheduler"])
    ckpt.set_rng_state(rng)
    return trainer


def export_policy(chat: Any, init_checkpoint: str | Path, final: Path) -> None:
    """final/ (or any named directory) laid out as every trained checkpoint: weights, tokenizer, frame policy."""
    from keye.model.checkpoint import save_checkpoint
    from keye.train.bundle import bundle_checkpoint

    with atomic_dir(final) as build:
        save_checkpoint(chat.model, build)
        bundle_checkpoint(build, Path(init_checkpoint), chat.policy, tok=chat.tok)
