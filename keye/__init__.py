"""Keye: an open pipeline for long-video multimodal training (Keye-VL-2.0 style)."""

__version__ = "0.1.0"

from keye.determinism import pin_cpu_kernels as _pin_cpu_kernels

_pin_cpu_kernels()  # before torch's first CPU op: every machine computes with the same kernels (keye.determinism)
