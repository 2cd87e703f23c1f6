"""Which parameters a stage trains, and the AdamW parameter groups (no weight decay on norms, biases and the
MoE router bias), as in Keye-VL (projector-only alignment) and DeepSeek-V3.2 (indexer-only DSA warm-up)."""

from __future__ import annotations

from torch import nn

from keye.model import KeyeVL


def apply_trainable(model: KeyeVL, trainable: str, attention_mode: str) -> list[str]:
    """Set requires_grad per the stage; returns the trained parameter names. In dense attention the indexer
    gets no loss, so it stays frozen (DDP would otherwise wait for its gradients)."""
    names: list[str] = []
    for name, p in model.named_parameters():
        is_indexer = ".indexer." in name
        if trainable == "projector":
            on = name.startswith("projector.")
        elif trainable == "indexer":
            on = is_indexer
        elif trainable == "all":
            on = not is_indexer or attention_mode != "dense"
        else:
            raise ValueError(f"unknown trainable {trainable!r}")
        p.requires_grad_(on)
        if on:
            names.append(name)
    if not names:
        raise ValueError(f"stage trains nothing (trainable={trainable}, attention={attention_mode})")
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
