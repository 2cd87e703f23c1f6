"""Keye: an open pipeline for long-video multimodal training (Keye-VL-2.0 style)."""

__version__ = "0.1.0"
