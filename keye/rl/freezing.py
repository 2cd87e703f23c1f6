"""Video-RL trains the language model only: the ViT and the projector stay as SFT left them (Keye-VL-2.0 and most
open VLM-RL recipes), which also keeps rollouts and training on identical visual tokens."""

from __future__ import annotations

from typing import Any

from keye.train.freezing import apply_trainable


def freeze_vision_and_projector(model: Any, freeze: bool = True) -> list[str]:
    """requires_grad off for vision.* and projector.* (unless freeze=False: the whole model trains) and for the
    DSA indexer in dense attention, as keye.train.freezing does; returns the names still trained."""
    modes = set(model.config.lm.attention_modes or ["dense"])
    apply_trainable(model, "all", "dense" if modes == {"dense"} else "dsa")
    names = []
    for name, p in model.named_parameters():
        if freeze and name.startswith(("vision.", "projector.")):
            p.requires_grad_(False)
        elif p.requires_grad:
            names.append(name)
    return names
