"""The trainer's sharded path (`parallel` given, several ranks): FSDP2 `fully_shard` over a dp_shard mesh in place
of accelerate's DDP, and step checkpoints through torch.distributed.checkpoint (every rank writes its shards,
asynchronously; keye.train.sharded_checkpoint) in place of the rank-0 gather. What stays the trainer's: the loss
rule, the loader, the schedule, the NaN policy, the final/ export (gathered once).

Expert and context parallelism (ep, cp > 1) are library pieces (keye.model.expert_parallel, context_parallel) not
run by the trainer yet; a mesh asking for them is refused here. Resume needs the world size that wrote the
checkpoint (the loader cursor is per rank; the weights and optimizer state themselves would reshard).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from keye.train import sharded_checkpoint as sc
from keye.train.parallel import ParallelSettings, resolve_mesh

_CKPT_GROUP: list[
    Any
] = []  # the gloo group of the background checkpoint writes (created once, on every rank)


def check_parallel(parallel: Mapping[str, Any] | ParallelSettings, world: int) -> ParallelSettings:
    p = parallel if isinstance(parallel, ParallelSettings) else ParallelSettings(**dict(parallel))
    shape = resolve_mesh(p, world)
    if shape.ep > 1 or shape.cp > 1:
        raise ValueError(
            f"parallel: {shape.describe()}: the trainer runs dp_shard only for now (ep and cp are library pieces, "
            "docs/TRAINING.md 'What is not wired yet')"
        )
    return p


def shard(model: nn.Module, world: int, device: torch.device, bf16: bool) -> nn.Module:
    """fully_shard over all ranks (fp32 shards; bf16 compute and fp32 gradient reduction on GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from keye.train.fsdp import shard_model
    from keye.train.parallel import MeshShape, build_mesh

    mesh = build_mesh(MeshShape(world, 1, 1), torch.device(device).type)["dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    if not _CKPT_GROUP:
        _CKPT_GROUP.append(dist.new_group(backend="gloo"))
    return shard_model(model, mesh, mp_policy=mp)


def all_finite(model: nn.Module) -> bool:
    """Every rank's shards are finite (the same answer on every rank)."""
    local = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters()
    )
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_CKPT_GROUP[0] if _CKPT_GROUP else None)
    return bool(flag[0] > 0)


def save(
    step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, settings
) -> sc.PendingSave:  # noqa: ANN001
    meta = {"step": state["step"], "stage": settings.name, "kind": settings.kind}
    group = _CKPT_GROUP[0] if _CKPT_GROUP else None
    return sc.save_sharded(step_dir, model, optimizer, state, async_save=True, process_group=group, meta=meta)


def load(step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: int) -> dict[str, Any]:
    meta = sc.read_meta(step_dir)
    if meta["world_size"] != world:
        raise sc.ShardedCheckpointError(
            f"{step_dir}: written by {meta['world_size']} ranks, resumed on {world}; the loader cursor is per rank, "
            f"so resume this stage with {meta['world_size']} ranks"
        )
    return sc.load_sharded(step_dir, model, optimizer, restore_rng=False)


def restore_rng(step_dir: Path) -> None:
    sc.restore_rng_state(step_dir)
