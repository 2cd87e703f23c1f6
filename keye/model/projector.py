"""Vision-to-LM projector: 2x2 patch merge -> LayerNorm(4D) -> Linear -> GELU -> Linear(-> LM hidden).

Follows Keye-VL / Qwen2-VL's PatchMerger. Merged tokens of a frame come out in raster order over the merged grid,
which is the order `keye.model.rope.mrope_positions` and `keye.model.vision_tokens.frame_tokens` assume.

`center=True` (ModelConfig.center_visual_tokens; on in the `tiny` preset) subtracts each frame's mean output token.
Why: trained from scratch on small frames that are mostly background, the tokens of a frame share one large
component that AdamW keeps growing (measured on the default pipeline: shared-component norm 0.7 at init, 73 after
pretrain, 244 after SFT, against 0.1-1.3 of per-token variation), so after the LM's RMSNorm every visual token
looks the same and the model cannot see the frame's content. Centering keeps only what differs between a frame's
tokens (objects against the background, where they are); a frame's overall colour is given up.
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
    def __init__(
        self, vision_hidden: int, lm_hidden: int, hidden: int = 0, merge: int = 2, center: bool = False
    ) -> None:
        super().__init__()
        self.merge = merge
        self.center = center
        width = vision_hidden * merge * merge
        hidden = hidden or width
        self.pre_norm = nn.LayerNorm(width, eps=1e-5)
        self.linear_1 = nn.Linear(width, hidden)
        # centring cancels any bias exactly: its gradient would be pure rounding noise, which Adam scales up to
        # lr-sized steps (and makes runs differ with the reduction order), so a centred projector has none
        self.linear_2 = nn.Linear(hidden, lm_hidden, bias=not center)

    def forward(self, features: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        """features [N, D] (raster per frame) -> [N / merge^2, lm_hidden]."""
        idx = merge_order(grids, self.merge, features.device)
        x = features[idx].reshape(-1, features.shape[-1] * self.merge * self.merge)
        y = self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))
        if not self.center or y.shape[0] == 0:
            return y
        sizes = torch.tensor([(h // self.merge) * (w // self.merge) for h, w in grids], device=y.device)
        frame = torch.repeat_interleave(torch.arange(len(grids), device=y.device), sizes)
        means = torch.zeros(len(grids), y.shape[-1], dtype=y.dtype, device=y.device).index_add_(0, frame, y)
        return y - (means / sizes[:, None].to(y.dtype))[frame]
