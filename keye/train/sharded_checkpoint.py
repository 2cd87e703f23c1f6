"""Sharded step checkpoints with torch.distributed.checkpoint (DCP): every rank writes only its own shards of the
model and optimizer (FSDP2 DTensors), nothing is gathered to rank 0, and a checkpoint loads on another world size
(DCP reshards by the saved global shapes and offsets: a 64-GPU job resumes on 32). torchtitan's checkpointer is
the model; this keeps keye's rules: the directory is built under a hidden temp name and renamed only after every
rank finished (meta.json last), per-rank RNG streams go through keye.train.state_io (no pickle), and the
safetensors export for keye.model.load_checkpoint stays (`export_full`, the only step that gathers).

Layout of a DCP step checkpoint: `.metadata` + `__<rank>_0.distcp` (DCP), `rng-rank{r}.safetensors`,
`extra.safetensors` (rank 0: scheduler, step, what the caller adds), `meta.json` written last (format, world size).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from keye.core.atomic import _fsync_dir, fsync_tree
from keye.train.checkpointing import rng_state, set_rng_state
from keye.train.state_io import load_state_file, save_state_file

FORMAT = "keye.dcp/v1"
META = "meta.json"


class ShardedCheckpointError(RuntimeError):
    """A DCP checkpoint that is incomplete, of another format, or does not match the model."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def temp_dir_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@dataclass
class PendingSave:
    """A save in flight: `wait()` finishes the shard writes (async) and commits the directory on every rank."""

    tmp: Path
    final: Path
    meta: dict[str, Any]
    future: Any = None  # concurrent.futures.Future of dcp.async_save, None when the save was synchronous
    done: bool = False

    def wait(self) -> Path:
        if self.done:
            return self.final
        if self.future is not None:
            self.future.result()
        _barrier()  # every rank's shards are on disk
        if _rank() == 0:
            (self.tmp / META).write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
            fsync_tree(self.tmp)
            if self.final.exists():  # a stale copy of the same step (crash after the rename): replace it
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
        _barrier()
        self.done = True
        return self.final


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
    *,
    async_save: bool = False,
    process_group: Any = None,
    meta: dict[str, Any] | None = None,
) -> PendingSave:
    """Write model + optimizer shards of every rank to `path` (a directory, committed by `.wait()`).

    async_save: the tensors are staged to CPU memory now and written by a background thread, so training can go on;
    call `.wait()` before the next save (and before exiting). Pass a gloo `process_group` for the background
    collectives when training uses NCCL (torchtitan does the same); on CPU the default group is used.
    """
    final = Path(path)
    tmp = temp_dir_for(final)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    save_state_file(rng_state(), tmp / f"rng-rank{_rank()}.safetensors")
    if _rank() == 0:
        save_state_file(extra or {}, tmp / "extra.safetensors")
    meta = {**(meta or {}), "format": FORMAT, "world_size": _world(), "optimizer": optimizer is not None}
    if async_save:
        fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=process_group)
        return PendingSave(tmp, final, meta, fut)
    dcp.save(state, checkpoint_id=str(tmp), process_group=process_group)
    return PendingSave(tmp, final, meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / META
    if not p.is_file():
        raise ShardedCheckpointError(
            f"{path}: no {META} (an unfinished or foreign checkpoint; it is never read)"
        )
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ShardedCheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load model (+ optimizer) shards into an already sharded (or plain) model on any world size; returns the
    `extra` dict. RNG streams are restored only when the world size is the one that wrote them (otherwise the
    per-rank streams have no meaning and are left as they are; training itself draws no random numbers)."""
    path = Path(path)
    meta = read_meta(path)
    if optimizer is not None and not meta["optimizer"]:
        raise ShardedCheckpointError(f"{path}: written without optimizer state; load the model only")
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = _only_saved(optim_sd, path)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # CheckpointException wraps per-rank failures: name the directory
        raise ShardedCheckpointError(f"{path}: does not match the model/optimizer ({e})") from e
    set_model_state_dict(model, state["model"])  # strict: every weight must come from the checkpoint
    if optimizer is not None:  # not strict: parameters that never had a gradient have no saved state
        set_optimizer_state_dict(model, optimizer, state["optim"], options=StateDictOptions(strict=False))
    if restore_rng:
        restore_rng_state(path)
    return read_extra(path)


def restore_rng_state(path: str | Path) -> bool:
    """This rank's RNG streams, when the checkpoint was written by as many ranks as there are now."""
    if read_meta(path)["world_size"] != _world():
        return False
    set_rng_state(load_state_file(Path(path) / f"rng-rank{_rank()}.safetensors"))
    return True


def read_extra(path: str | Path) -> dict[str, Any]:
    """What the caller saved beside the shards (the trainer: step, scheduler, loader cursors, metrics)."""
    return load_state_file(Path(path) / "extra.safetensors")


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / "extra.safetensors").is_file() and (Path(path) / ".metadata").is_file()


def _only_saved(optim_sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """The optimizer-state entries the checkpoint holds. AdamW keeps no state for a parameter that never had a
    gradient (e.g. the ViT in a text-only stage); such entries are left out of the load instead of failing it."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefixes = {k.rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    state = {fqn: v for fqn, v in optim_sd["state"].items() if f"optim.state.{fqn}" in prefixes}
    return {**optim_sd, "state": state}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state on rank 0's CPU (others get {}): the safetensors export's input."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    return sd if _rank() == 0 else {}


def export_full(model: nn.Module, config: Any, out_dir: str | Path) -> Path:
    """keye.model checkpoint layout (config.json + safetensors) from a sharded model: keye.model.load_checkpoint
    reads it. The one place the weights are gathered (once, at the end of a stage)."""
    from keye.model.checkpoint import TIED_KEY, save_state

    state = full_state(model)
    out = Path(out_dir)
    if _rank() == 0:
        if config.lm.tie_word_embeddings:
            state.pop(TIED_KEY, None)
        save_state({k: v.detach().cpu() for k, v in state.items()}, config, out)
    _barrier()
    return out
