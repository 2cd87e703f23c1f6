"""The trainer's sharded path (`parallel` given): the mesh dp_shard x ep x cp of keye.train.parallel, FSDP2
`fully_shard` over it in place of accelerate's DDP, and step checkpoints through torch.distributed.checkpoint (every
rank writes its shards, asynchronously; keye.train.sharded_checkpoint) in place of the rank-0 gather. What stays the
trainer's: the loss rule, the loader, the schedule, the NaN policy, the final/ export (gathered once).

How the pieces compose (torchtitan's layout):
  dp_shard  ranks read different packs; every weight is FSDP-sharded over all ranks
  ep        ranks read different packs too; each MoE layer's experts are split over ep (tokens travel by
            all-to-all, keye.model.expert_parallel) and FSDP-sharded over dp_shard x cp
  cp        ranks share one pack, each holding 2 of its 2*cp load-balanced chunks (keye.model.context_parallel);
            the pack is padded with one no-loss sample to a multiple of 2*cp rows
  vit_apart the ViT encodes the frames of every rank's pack dealt over all ranks (keye.model.vision_parallel)
The gradient of every weight is that of the global batch's loss, the same as one process taking all the packs of
a step (tests/unit/train/test_train_mesh.py): the loss is scaled by the world size to undo FSDP's mean, the expert
gradients (averaged over dp_shard x cp only) by 1/ep more, and the indexer KL (each cp rank holds a share) by cp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from keye.train import sharded_checkpoint as sc
from keye.train.parallel import MeshShape, ParallelSettings, TrainMesh, build_train_mesh, resolve_mesh

_CKPT_GROUP: list[
    Any
] = []  # the gloo group of the background checkpoint writes (created once, on every rank)


def check_parallel(
    parallel: Mapping[str, Any] | ParallelSettings, world: int, model_config: Any = None
) -> tuple[ParallelSettings, MeshShape]:
    """The settings and the mesh, or an error naming the train.parallel field to change (before any work)."""
    p = parallel if isinstance(parallel, ParallelSettings) else ParallelSettings(**dict(parallel))
    experts = model_config.lm.num_experts if model_config is not None else None
    shape = resolve_mesh(p, world, experts)
    if p.vit_apart and shape.cp > 1:
        raise ValueError(
            f"train.parallel.vit_apart with cp={shape.cp}: the ViT apart deals the frames of data-parallel "
            "packs; with context parallelism every cp rank encodes its pack's frames (set vit_apart: false)"
        )
    if model_config is not None and shape.cp > 1:
        lm = model_config.lm
        modes = {lm.mode_of(i) for i in range(lm.num_layers)}
        if modes != {"dense"} and lm.dsa.selection == "block":
            raise ValueError(
                f"train.parallel.cp={shape.cp} with DSA block selection (model dsa.selection=block): context "
                "parallelism covers token selection only; set cp: 1 or token selection"
            )
    return p, shape


def init_process_group(world: int, device: torch.device) -> None:
    """A one-process group (nccl on CUDA, gloo on CPU) when the sharded path runs without torchrun (world 1: e.g.
    resuming a sharded checkpoint on one process); torchrun / accelerate have set up the group otherwise."""
    if world == 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(
    model: nn.Module, p: ParallelSettings, shape: MeshShape, device: torch.device, bf16: bool
) -> TrainMesh:
    """EP (experts split over ep), the model's context flags, then fully_shard (fp32 shards; bf16 compute and
    fp32 gradient reduction on GPU). Returns the meshes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from keye.model.expert_parallel import shard_experts
    from keye.train.fsdp import shard_model

    tm = build_train_mesh(shape, torch.device(device).type)
    if shape.ep > 1:  # the balance loss stays one per pack (as on one process), not the ep group's
        shard_experts(model, tm.ep, group_balance=False)
    model.vision_always = True  # FSDP: every rank enters the vision units, with or without frames
    if p.vit_apart and shape.world > 1:
        model.vision_group = dist.group.WORLD
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    if not _CKPT_GROUP:
        _CKPT_GROUP.append(dist.new_group(backend="gloo"))
    shard_model(model, tm.all, mp_policy=mp, expert_mesh=tm.experts_dp if shape.ep > 1 else None)
    return tm


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    from keye.model.moe import MoE

    return [w for m in model.modules() if isinstance(m, MoE) for w in (m.w_gate, m.w_up, m.w_down)]


@torch.no_grad()
def scale_expert_grads(model: nn.Module, ep: int) -> None:
    """FSDP averages an expert's gradient over dp_shard x cp (world / ep ranks) while the loss was scaled by the
    world size: divide by ep more, so it is the gradient of the global loss like every other weight's."""
    if ep > 1:
        for w in expert_parameters(model):
            if w.grad is not None:
                w.grad.mul_(1.0 / ep)


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over DTensor gradients living on different meshes (EP: the experts' 2-D
    mesh beside the dense weights' 1-D one): the 2-norm of each mesh's gradients, combined, then one scale for
    all (clip_grad_norm_'s formula). Returns the total norm (every rank the same)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    sq = 0.0
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        n = n.full_tensor() if hasattr(n, "full_tensor") else n
        sq += float(n.double()) ** 2
    total = math.sqrt(sq)
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for grads in groups.values():
            for g in grads:
                g.mul_(coef)
    return total


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


def load(step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights and optimizer state resharded onto this mesh (any world size); RNG restored by restore_rng."""
    return sc.load_sharded(step_dir, model, optimizer, restore_rng=False)


def restore_rng(step_dir: Path) -> None:
    sc.restore_rng_state(step_dir)
