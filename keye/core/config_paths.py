"""Every path a pipeline config names, checked before any work: a missing tokenizer must not surface after ingest,
caption and shard have run for minutes, nor a missing source after the workspace, MLflow and lineage exist.

Only the paths of the stages that will run are checked (a `keye train` does not need the video sources). Remote
URLs are left to the stage that reads them (checking them here would need the network); local paths resolve
against the current directory, as the stages resolve them.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from urllib.parse import urlparse

from keye.core.config import PathSource, PipelineConfig


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _local(s: str) -> Path:
    return Path(s.removeprefix("file://")).expanduser()


def _dir_problem(field: str, value: str, must_hold: str | None, what: str) -> str | None:
    p = _local(value)
    if not p.exists():
        return f"{field}: {p} does not exist ({what})"
    if not p.is_dir():
        return f"{field}: {p} is not a directory ({what})"
    if not os.access(p, os.R_OK | os.X_OK):
        return f"{field}: {p} is not readable (permission denied)"
    if must_hold and not (p / must_hold).is_file():
        return f"{field}: {p} has no {must_hold} ({what})"
    return None


def _source_problem(i: int, src: PathSource) -> str | None:
    field = f"sources[{i}].path"
    spec = src.path
    if _is_url(spec):
        return None
    p = _local(spec)
    if any(ch in spec for ch in "*?["):
        return None if glob.glob(str(p), recursive=True) else f"{field}: the glob {spec!r} matches no file"
    if not p.exists():
        return f"{field}: {p} does not exist (give an existing folder, glob, URL or manifest file)"
    if not os.access(p, os.R_OK):
        return f"{field}: {p} is not readable (permission denied)"
    return None


def _caption_problems(cfg: PipelineConfig) -> list[str]:
    opts, backend = cfg.caption.options, cfg.caption.backend
    out: list[str | None] = []
    if backend == "hf" and "model_dir" in opts:
        out.append(
            _dir_problem(
                "caption.options.model_dir",
                str(opts["model_dir"]),
                "config.json",
                "a local transformers model dir",
            )
        )
    if backend == "keye" and "checkpoint_dir" in opts:
        out.append(
            _dir_problem(
                "caption.options.checkpoint_dir",
                str(opts["checkpoint_dir"]),
                "config.json",
                "a keye checkpoint dir",
            )
        )
    if backend == "sidecar" and opts.get("annotations_dir"):
        out.append(
            _dir_problem(
                "caption.options.annotations_dir",
                str(opts["annotations_dir"]),
                None,
                "the folder of annotation files",
            )
        )
    if backend == "openai" and "base_url" in opts:
        url = urlparse(str(opts["base_url"]))
        if url.scheme not in ("http", "https") or not url.netloc:
            out.append(
                f"caption.options.base_url: {opts['base_url']!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)"
            )
    return [p for p in out if p]


def path_problems(cfg: PipelineConfig, stages: list[str] | None = None) -> list[str]:
    """One line per missing or unreadable path among the stages that will run ([] when all are fine)."""
    stages = list(cfg.stages if stages is None else stages)
    out: list[str | None] = []
    if "ingest" in stages:
        out += [_source_problem(i, s) for i, s in enumerate(cfg.sources) if isinstance(s, PathSource)]
    if "caption" in stages:
        out += _caption_problems(cfg)
    if "pack" in stages and cfg.pack.tokenizer.path:
        out.append(
            _dir_problem(
                "pack.tokenizer.path",
                cfg.pack.tokenizer.path,
                "tokenizer.json",
                "a local Hugging Face tokenizer dir",
            )
        )
    if "train" in stages and cfg.train.init_checkpoint:
        out.append(
            _dir_problem(
                "train.init_checkpoint",
                cfg.train.init_checkpoint,
                "config.json",
                "a checkpoint dir, e.g. `keye convert hf` output",
            )
        )
    return [p for p in out if p]


def check_paths(cfg: PipelineConfig, stages: list[str] | None = None, origin: str = "config") -> None:
    """Raise ConfigError listing every path problem, one per line (before the workspace is touched)."""
    from keye.core.config import ConfigError

    problems = path_problems(cfg, stages)
    if problems:
        raise ConfigError(
            f"{origin}: {len(problems)} path problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )
