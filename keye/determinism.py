"""One call that pins every random and order-dependent choice of a process to the run's seed (issue 24).

Why: the same commit, config and seed must give the same bytes, the same checkpoint and the same scores, so a
change can be told from noise. What cannot be pinned here (GPU atomics in kernels without a fixed-order variant,
different CPU thread counts across machines) is listed in docs/TRAINING.md, "Reproducibility".

Importing `keye` pins torch's CPU kernels to one instruction set when KEYE_CPU_KERNELS=avx2 asks for it
(`pin_cpu_kernels`), before torch runs any op, so no numpy or torch import may come first in this module.
"""

from __future__ import annotations

import os
import platform
import random
import warnings

# x86-64 CPU kernels on one instruction set, on request (KEYE_CPU_KERNELS=avx2): torch's vectorised ATen kernels,
# MKL's GEMM (conditional numerical reproducibility) and oneDNN. Why: they pick code by CPU feature, and the same
# commit, config and seed trained another SFT checkpoint on an AVX-512/AMX Xeon than on the AMD Zen 4 VMs before
# it, where the default run's Video-RL gain went from p 0.0066 to p 0.86 (bench/RESULTS.md "CPU kernels on one
# instruction set"). Not the default: on the pinned path the default run's MOPD student forgets 0.2 points against
# sequential training's 0.0, failing issue 18's check, and no setting found reproduces the Zen 4 bytes on the Xeon.
# Cost on that Xeon: an agent warm-up step 0.57 s instead of 0.45 s; the default pipeline 10 min 4 s.
CPU_KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_kernels() -> None:
    """With KEYE_CPU_KERNELS=avx2, set CPU_KERNEL_ENV where the operator has not (a value set beforehand wins).
    torch reads these at its first CPU op, not at import, so `import keye` after `import torch` still pins."""
    choice = os.environ.get("KEYE_CPU_KERNELS", "native").lower()
    if choice not in ("native", "avx2"):
        raise ValueError(
            f"KEYE_CPU_KERNELS={choice!r}: use native (torch's own choice) or avx2 (every machine alike)"
        )
    if choice == "avx2" and _x86():
        for key, value in CPU_KERNEL_ENV.items():
            os.environ.setdefault(key, value)


def check_cpu_kernels() -> None:
    """Warn when the pin was asked for but torch chose its CPU kernels before it (a CPU op ran before `keye` was
    imported)."""
    import torch

    want = os.environ.get("ATEN_CPU_CAPABILITY")
    if os.environ.get("KEYE_CPU_KERNELS", "").lower() != "avx2" or not want or not _x86():
        return
    have = torch.backends.cpu.get_cpu_capability()
    if have.lower() != want.lower():
        warnings.warn(
            f"torch runs its CPU kernels as {have}, not ATEN_CPU_CAPABILITY={want}: a torch op ran before `keye` "
            "was imported, so results may differ from other machines; import keye first (keye.determinism)",
            RuntimeWarning,
            stacklevel=2,
        )


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
    import numpy as np
    import torch

    check_cpu_kernels()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's fixed-order workspace
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def without_timings(metrics: dict) -> dict:
    """`metrics` minus wall-clock measurements (they differ run to run and would change a hashed file)."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
