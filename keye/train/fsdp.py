"""FSDP2 (`fully_shard`) over a KeyeVL or LanguageModel: one unit per decoder layer and per ViT block, the root last
(torchtitan's wrapping). Parameters become DTensors sharded on dim 0 over the mesh given; the forward gathers one
layer at a time and the backward reduce-scatters its gradients, so params, grads and AdamW states are 1/N per rank.

Under expert parallelism (the experts already DTensors over the ep mesh, keye.model.expert_parallel.shard_experts)
each MoE block's experts are their own unit over `expert_mesh` (the dp_shard x cp ranks that hold the same
experts; torchtitan's dp_shard_mod_ep), so an expert weight is sharded over ep, then over dp_shard x cp; the
router is its own small unit over the whole mesh, as it is replicated over ep like every dense weight.
"""

from __future__ import annotations

from torch import nn


def shard_model(
    model: nn.Module,
    mesh,  # noqa: ANN001
    reshard_after_forward: bool = True,
    mp_policy=None,  # noqa: ANN001
    expert_mesh=None,  # noqa: ANN001
) -> nn.Module:
    """Apply fully_shard in place (decoder layers, ViT blocks, then the root) and return the model. mp_policy: an
    FSDP2 MixedPrecisionPolicy (None: compute in the parameters' dtype). expert_mesh: see the module docstring
    (None: the experts belong to their decoder layer's unit)."""
    from functools import partial

    from torch.distributed.fsdp import fully_shard

    if mp_policy is not None:
        fully_shard = partial(fully_shard, mp_policy=mp_policy)

    lm = getattr(model, "lm", model)
    for layer in lm.layers:
        if expert_mesh is not None:
            fully_shard(layer.mlp.gate, mesh=mesh, reshard_after_forward=reshard_after_forward)
            fully_shard(layer.mlp, mesh=expert_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    vision = getattr(model, "vision", None)
    for block in vision.encoder.layers if vision is not None else []:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root (embeddings, final norm, LM head) stays gathered after the forward, as torchtitan does: its
    # parameters are needed again at once by the backward, and the fused loss keeps a view of the head's weight
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model
