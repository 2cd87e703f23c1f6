"""FSDP2 (`fully_shard`) over a KeyeVL or LanguageModel: one unit per decoder layer and per ViT block, the root last
(torchtitan's wrapping). Parameters become DTensors sharded on dim 0 over the mesh given; the forward gathers one
layer at a time and the backward reduce-scatters its gradients, so params, grads and AdamW states are 1/N per rank.
"""

from __future__ import annotations

from torch import nn


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:  # noqa: ANN001
    """Apply fully_shard in place (decoder layers, ViT blocks, then the root) and return the model. mp_policy: an
    FSDP2 MixedPrecisionPolicy (None: compute in the parameters' dtype)."""
    from functools import partial

    from torch.distributed.fsdp import fully_shard

    if mp_policy is not None:
        fully_shard = partial(fully_shard, mp_policy=mp_policy)

    lm = getattr(model, "lm", model)
    for layer in lm.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    vision = getattr(model, "vision", None)
    for block in vision.encoder.layers if vision is not None else []:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root (embeddings, final norm, LM head) stays gathered after the forward, as torchtitan does: its
    # parameters are needed again at once by the backward, and the fused loss keeps a view of the head's weight
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model
