"""The device mesh of a training job: dp_shard x ep x cp, named dims, validated against the world size.

Layout (torchtitan's idea, kept to three named dims): every rank holds a different slice of the batch along
dp_shard and ep (data-parallel degree dp_shard * ep), the same samples but a different chunk of the sequence
along cp. Dense parameters are sharded by FSDP2 over all ranks (the flattened mesh); the experts of each MoE
layer are split over ep (each ep rank owns num_experts / ep of them, tokens travel by all-to-all) and FSDP-sharded
over dp_shard x cp. The settings are plain data so `keye doctor`, MLflow params and `keye plan` can show them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

MESH_DIMS = ("dp_shard", "ep", "cp")


class ParallelSettings(BaseModel):
    """`train.parallel` in pipelines.yaml. dp_shard None takes what the world size leaves after ep x cp."""

    model_config = ConfigDict(extra="forbid")

    dp_shard: int | None = Field(None, ge=1, description="FSDP2 shard degree (None: world / (ep * cp))")
    ep: int = Field(1, ge=1, description="expert-parallel degree (divides the number of experts)")
    cp: int = Field(1, ge=1, description="context-parallel degree (sequence split, load-balanced causal)")
    vit_apart: bool = Field(
        False,
        description="the ViT data-parallel over all ranks on the global batch's frames (not with cp > 1)",
    )


class MeshError(ValueError):
    """A mesh that cannot be built for this world size or model; the message says which number to change."""


@dataclass(frozen=True)
class MeshShape:
    dp_shard: int
    ep: int
    cp: int

    @property
    def world(self) -> int:
        return self.dp_shard * self.ep * self.cp

    @property
    def data_parallel(self) -> int:
        """Ranks that read different samples (dp_shard x ep)."""
        return self.dp_shard * self.ep

    def as_params(self) -> dict[str, int]:
        """MLflow params: parallel.dp_shard, parallel.ep, parallel.cp, parallel.world."""
        return {
            f"parallel.{k}": v for k, v in (*zip(MESH_DIMS, self.dims(), strict=True), ("world", self.world))
        }

    def dims(self) -> tuple[int, int, int]:
        return (self.dp_shard, self.ep, self.cp)

    def describe(self) -> str:
        return f"dp_shard={self.dp_shard} x ep={self.ep} x cp={self.cp} = {self.world} ranks"


def resolve_mesh(settings: ParallelSettings | None, world: int, num_experts: int | None = None) -> MeshShape:
    """The mesh for `world` ranks; errors name the setting to change."""
    s = settings or ParallelSettings()
    if world < 1:
        raise MeshError(f"world size must be >= 1, got {world}")
    if world % (s.ep * s.cp):
        raise MeshError(
            f"train.parallel: ep={s.ep} x cp={s.cp} = {s.ep * s.cp} does not divide the world size {world}; "
            "choose ep and cp whose product divides the number of ranks"
        )
    dp = s.dp_shard if s.dp_shard is not None else world // (s.ep * s.cp)
    shape = MeshShape(dp, s.ep, s.cp)
    if shape.world != world:
        raise MeshError(
            f"train.parallel: dp_shard={dp} x ep={s.ep} x cp={s.cp} = {shape.world} ranks, but the job has "
            f"{world}; set dp_shard to {world // (s.ep * s.cp)} or leave it out"
        )
    if num_experts is not None and num_experts % s.ep:
        raise MeshError(
            f"train.parallel.ep={s.ep} does not divide the model's {num_experts} experts; "
            "choose an ep that divides it"
        )
    return shape


@dataclass(frozen=True)
class TrainMesh:
    """The trainer's view of the mesh. The DeviceMesh is laid out (dp_shard, cp, ep), ep innermost (the
    all-to-all stays among neighbouring ranks, inside a node when ep <= GPUs per node) and dp_shard x cp
    contiguous so it flattens into the experts' FSDP mesh, as torchtitan's dp_shard_mod_ep."""

    shape: MeshShape
    all: object  # DeviceMesh, 1-D over every rank: FSDP of the dense parameters
    experts_dp: object  # DeviceMesh, 1-D over dp_shard x cp (the ranks holding the same experts): their FSDP
    ep: object  # DeviceMesh, 1-D: the expert-parallel group of this rank
    cp: object  # DeviceMesh, 1-D: the ranks sharing one pack
    dp_rank: int  # this rank's index among the dp_shard x ep data-parallel ranks (its loader rank)


def build_train_mesh(shape: MeshShape, device_type: str = "cpu") -> TrainMesh:
    """The meshes the trainer shards with, over the initialised default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise MeshError("torch.distributed is not initialised: launch with torchrun (docs/TRAINING.md)")
    if dist.get_world_size() != shape.world:
        raise MeshError(f"mesh {shape.describe()} but the process group has {dist.get_world_size()} ranks")
    root = init_device_mesh(
        device_type, (shape.dp_shard, shape.cp, shape.ep), mesh_dim_names=("dp_shard", "cp", "ep")
    )
    d, _, e = root.get_coordinate()
    return TrainMesh(
        shape=shape,
        all=root[("dp_shard", "cp", "ep")]._flatten("dp_all"),
        experts_dp=root[("dp_shard", "cp")]._flatten("dp_mod_ep"),
        ep=root["ep"],
        cp=root["cp"],
        dp_rank=d * shape.ep + e,
    )


def build_mesh(shape: MeshShape, device_type: str = "cpu"):  # -> DeviceMesh
    """The DeviceMesh (dims named dp_shard, ep, cp) over the initialised default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise MeshError("torch.distributed is not initialised: launch with torchrun (docs/TRAINING.md)")
    if dist.get_world_size() != shape.world:
        raise MeshError(f"mesh {shape.describe()} but the process group has {dist.get_world_size()} ranks")
    return init_device_mesh(device_type, shape.dims(), mesh_dim_names=MESH_DIMS)
