"""Cache keys of stages: input artifact ids + settings + the code that computes the stage.

A re-run skips a stage whose key is already a complete artifact in lineage; change the inputs, the settings or
the code and the key changes, so the stage runs again (DESIGN.md: "cache key = input artifact ids + stage config hash").
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from typing import Any

from pydantic import BaseModel


def stable_hash64(text: str) -> int:
    """A 64-bit hash of text that is the same in every process and run (Python's hash() is salted per process):
    for deterministic per-sample choices that must survive a restart."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def settings_hash(settings: BaseModel | dict[str, Any], *extra: Any) -> str:
    """Stable short hash of settings (and extra inputs)."""
    data = settings.model_dump(mode="json") if isinstance(settings, BaseModel) else settings
    blob = json.dumps([data, list(extra)], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_hash(*module_names: str) -> str:
    """Hash of the source of the modules that compute a stage's output."""
    h = hashlib.sha256()
    for name in sorted(module_names):
        mod = importlib.import_module(name)
        try:
            h.update(inspect.getsource(mod).encode())
        except (OSError, TypeError):
            h.update(name.encode())
    return h.hexdigest()[:16]
