"""Vision-to-LM projector: 2x2 patch merge -> LayerNorm(4D) -> Linear -> GELU -> Linear(-> LM hidden).

Follows Keye-VL / Qwen2-VL's PatchMerger. Merged tokens of a frame come out in raster order over the merged grid,
which is the order `keye.model.rope.mrope_positions` and `keye.model.vision_tokens.frame_tokens` assume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def merge_order(grids: list[tuple[int, int]], merge: int = 2, device: torch.device | None = None) -> Tensor:
    """Gather index that brings each merge x merge window's patches together (windows in raster order)."""
    parts, offset = [], 0
    for h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"patch grid {h}x{w} is not divisible by the merge size {merge}")
        idx = torch.arange(h * w).view(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).reshape(-1)
        parts.append(idx + offset)
        offset += h * w
    return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.int64, device=device)


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, lm_hidden: int, hidden: int = 0, merge: int = 2) -> None:
        super().__init__()
        self.merge = merge
        width = vision_hidden * merge * merge
        hidden = hidden or width
        self.pre_norm = nn.LayerNorm(width, eps=1e-5)
        self.linear_1 = nn.Linear(width, hidden)
        self.linear_2 = nn.Linear(hidden, lm_hidden)

    def forward(self, features: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        """features [N, D] (raster per frame) -> [N / merge^2, lm_hidden]."""
        idx = merge_order(grids, self.merge, features.device)
        x = features[idx].reshape(-1, features.shape[-1] * self.merge * self.merge)
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))
