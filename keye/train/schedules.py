"""Learning-rate schedules as multipliers of the peak lr: linear warm-up, then cosine, warmup-stable-decay (WSD,
MiniCPM arXiv 2404.06395) or constant. Plain functions of the step, so a resumed scheduler needs only its step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_multiplier(
    step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.1, decay_fraction: float = 0.2
) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, total - warmup)
        frac = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    if kind == "wsd":
        decay = max(1, int(round(total * decay_fraction)))
        start = total - decay
        if step < start:
            return 1.0
        frac = min(1.0, (step - start + 1) / decay)
        return 1.0 - (1 - min_ratio) * frac
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int,
    kind: str,
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> torch.optim.lr_scheduler.LambdaLR:
    fn: Callable[[int], float] = lambda s: lr_multiplier(s, total, warmup, kind, min_ratio, decay_fraction)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
