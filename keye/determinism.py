"""One call that pins every random and order-dependent choice of a process to the run's seed (issue 24).

Why: the same commit, config and seed must give the same bytes, the same checkpoint and the same scores, so a
change can be told from noise. What cannot be pinned here (GPU atomics in kernels without a fixed-order variant,
different CPU thread counts across machines) is listed in docs/TRAINING.md, "Reproducibility".

Importing `keye` pins torch's CPU kernels to one instruction set (`pin_cpu_kernels`; KEYE_CPU_KERNELS=native opts
out), before torch runs any op, so no numpy or torch import may come first in this module.
"""

from __future__ import annotations

import os
import platform
import random
import warnings

# x86-64 CPU kernels of every machine on one instruction set (KEYE_CPU_KERNELS=avx2, the default): torch's
# vectorised ATen kernels, MKL's GEMM (conditional numerical reproducibility) and oneDNN. Why: they pick code by CPU
# feature, and the same commit, config and seed trained another SFT checkpoint on an AVX-512/AMX Xeon than on the
# AMD Zen 4 VMs before it, where the default run's Video-RL gain went from p 0.0066 to p 0.86 (bench/RESULTS.md
# "CPU kernels on one instruction set"). AVX2 is what every x86-64 server of the last decade runs.
# KEYE_CPU_KERNELS=native gives torch its own choice back (faster: an agent warm-up step 0.45 s instead of 0.57 s
# on that Xeon), at the price of results that differ across CPU models.
CPU_KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _pinning() -> bool:
    """KEYE_CPU_KERNELS read once for both the pin and its check: avx2 (the default) or native."""
    choice = os.environ.get("KEYE_CPU_KERNELS", "avx2").lower()
    if choice not in ("native", "avx2"):
        raise ValueError(
            f"KEYE_CPU_KERNELS={choice!r}: use native (torch's own choice) or avx2 (every machine alike)"
        )
    return choice == "avx2" and _x86()


def pin_cpu_kernels() -> None:
    """Unless KEYE_CPU_KERNELS=native, set CPU_KERNEL_ENV where the operator has not (a value set beforehand wins).
    torch reads these at its first CPU op, not at import, so `import keye` after `import torch` still pins."""
    if _pinning():
        for key, value in CPU_KERNEL_ENV.items():
            os.environ.setdefault(key, value)


def check_cpu_kernels() -> None:
    """Warn when torch chose its CPU kernels before the pin (a CPU op ran before `keye` was imported)."""
    import torch

    want = os.environ.get("ATEN_CPU_CAPABILITY")
    if not want or not _pinning():
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
