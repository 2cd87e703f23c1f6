"""Frames to ViT patches: the one patch layout (each patch (C, P, P), raster order per frame) and the SigLIP pixel
normalisation, for the loader (numpy, uint8 frames) and the model side (torch) alike."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from keye.model.vision_tokens import PATCH

PIXEL_MEAN = 0.5  # SigLIP normalisation: (x / 255 - 0.5) / 0.5
PIXEL_STD = 0.5


def patchify(frames: Tensor, patch: int = PATCH) -> tuple[Tensor, Tensor]:
    """frames [n, C, H, W] (H, W multiples of patch) -> (patches [n*h*w, C*P*P] raster order, grids int32 [n, 3])."""
    n, c, h, w = frames.shape
    gh, gw = h // patch, w // patch
    x = frames.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    grids = torch.tensor([[1, gh, gw]] * n, dtype=torch.int32)
    return x.reshape(n * gh * gw, c * patch * patch), grids


def frame_patches(frames: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """uint8 [n, H, W, 3] -> normalised float32 patches [n*gh*gw, 3*P*P], raster order per frame, each (C, P, P)
    (the layout of `patchify`). One strided copy, then in-place scaling."""
    n, h, w, c = frames.shape
    gh, gw = h // patch, w // patch
    out = np.empty((n * gh * gw, c * patch * patch), dtype=np.float32)
    out.reshape(n, gh, gw, c, patch, patch)[...] = frames.reshape(n, gh, patch, gw, patch, c).transpose(
        0, 1, 3, 5, 2, 4
    )
    out *= 1.0 / (255.0 * PIXEL_STD)
    out -= PIXEL_MEAN / PIXEL_STD
    return out
