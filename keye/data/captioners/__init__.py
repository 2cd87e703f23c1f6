"""Pluggable captioners: one config dict in, a ``Captioner`` out; one ``CaptionRecord`` per clip.

Backends (``backend`` key of the config; the other keys are the backend's constructor options):
- ``sidecar``: annotation files next to the videos (``sidecar.SidecarCaptioner``)
- ``openai``: any OpenAI-compatible chat-completions endpoint, e.g. vLLM or SGLang (``openai_compat``)
- ``hf``: a local transformers vision-language model directory (``hf_local``)
- ``keye``: this project's own checkpoint (``keye_checkpoint``)
Backends are imported only when built, so ``sidecar`` never imports transformers or httpx.
Error policy: see ``keye.data.captioners.base``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from keye.data.captioners.base import (
    Captioner,
    CaptionerError,
    CaptionerUnavailable,
    CaptionRecord,
    ClipRef,
)

__all__ = [
    "BACKENDS",
    "CaptionRecord",
    "Captioner",
    "CaptionerError",
    "CaptionerUnavailable",
    "ClipRef",
    "build_captioner",
    "register_backend",
]

# name -> "module:class"; a class is built with the config's remaining keys as keyword arguments
BACKENDS: dict[str, str | Callable[..., Captioner]] = {
    "sidecar": "keye.data.captioners.sidecar:SidecarCaptioner",
    "openai": "keye.data.captioners.openai_compat:OpenAICompatCaptioner",
    "hf": "keye.data.captioners.hf_local:HFLocalCaptioner",
    "keye": "keye.data.captioners.keye_checkpoint:KeyeCheckpointCaptioner",
}


def register_backend(name: str, factory: str | Callable[..., Captioner]) -> None:
    """Add a backend (a class or "module:class"), e.g. from a plugin or a test."""
    BACKENDS[name] = factory


def _resolve(ref: str | Callable[..., Captioner]) -> Callable[..., Captioner]:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_captioner(cfg: dict[str, Any]) -> Captioner:
    """Build a captioner from ``{"backend": name, **options}``; unknown backends or options fail with a clear
    message naming what is accepted, before any work."""
    if not isinstance(cfg, dict) or "backend" not in cfg:
        raise ValueError(f"captioner config needs a 'backend' key (one of {sorted(BACKENDS)}), got {cfg!r}")
    opts = dict(cfg)
    name = opts.pop("backend")
    if name not in BACKENDS:
        raise ValueError(f"unknown captioner backend {name!r}; known: {sorted(BACKENDS)}")
    factory = _resolve(BACKENDS[name])
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [k for k, p in params.items() if k != "self"]
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            raise ValueError(f"captioner {name!r}: unknown option(s) {unknown}; accepted: {accepted}")
        missing = [
            k
            for k, p in params.items()
            if p.default is inspect.Parameter.empty and k not in opts and k != "self"
        ]
        if missing:
            raise ValueError(f"captioner {name!r}: missing required option(s) {missing}")
    return factory(**opts)
