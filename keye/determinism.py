"""One call that pins every random and order-dependent choice of a process to the run's seed (issue 24).

Why: the same commit, config and seed must give the same bytes, the same checkpoint and the same scores, so a
change can be told from noise. What cannot be pinned here (GPU atomics in kernels without a fixed-order variant,
different CPU thread counts across machines) is listed in docs/TRAINING.md, "Reproducibility".
"""

from __future__ import annotations

import os
import random

import numpy as np

# Keys of step metrics that measure time, not training: kept out of anything that is hashed.
TIMING_KEYS = frozenset(
    {
        "step_time_s",
        "tokens_per_s",
        "wall_s",
        "latency_s",
        "step_seconds",
        "rollout_tokens_per_s",
        "train_tokens_per_s",
    }
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels where it has them (a warning, not an
    error, for an op without one, e.g. a CUDA scatter-add)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's fixed-order workspace
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def without_timings(metrics: dict) -> dict:
    """`metrics` minus wall-clock measurements (they differ run to run and would change a hashed file)."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
