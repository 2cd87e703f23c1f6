"""The `video_rl` config section as the library's GRPO settings: apart from the stage module so that benches that
run the library's RL loop on a machine without the tracking stack (MLflow, DuckDB) can build the same settings."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel

from keye.core.config import VideoRLSettings
from keye.rl.context_rl import ContextRLSettings
from keye.rl.grpo import GRPOSettings


def shared_fields(library_cls: type, section: BaseModel, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The section's values of every field the library dataclass also has: config and library name each knob
    the same way (as verl / TRL name them), so a new knob needs no mapping line here."""
    names = {f.name for f in dataclasses.fields(library_cls)} - set(exclude)
    return {n: getattr(section, n) for n in type(section).model_fields if n in names}


def grpo_settings(s: VideoRLSettings) -> GRPOSettings:
    """The library's settings from the config section; Context-RL only when enabled."""
    c = s.context_rl
    context = ContextRLSettings(**shared_fields(ContextRLSettings, c)) if c.enabled else None
    return GRPOSettings(**shared_fields(GRPOSettings, s, exclude=("context_rl",)), context_rl=context)
