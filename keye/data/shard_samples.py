"""Shard samples from captioned clips: encode each clip (cached), its sample JSON, one planned shard written
(keye.stages.shard picks the clips and records the shards in lineage).

Work is split so a crash loses little: clips are encoded into a cache (atomic, skipped when present), then shards
are planned by actual size and each is written atomically and recorded in lineage as soon as it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.core.atomic import remove_stale_temps
from keye.data import shards
from keye.data.shards import EncodeParams, ShardInfo, ensure_clip


@dataclass(frozen=True)
class ShardItem:
    key: str
    clip_id: str
    caption_id: str
    video_id: str
    video_sha256: str | None
    source_path: str
    start: float
    end: float
    record: dict[str, Any]
    source_ref: str = ""  # what the sample JSON records: workspace-relative inside the workspace (issue 24)


@dataclass(frozen=True)
class EncodedItem:
    item: ShardItem
    mp4: str
    width: int
    height: int
    fps: float
    duration: float
    bytes: int


def remove_partial_files(out_dir: str | Path, cache_dir: str | Path, params: EncodeParams) -> int:
    """Temp files of writers killed in an earlier run (the stage holds the workspace lock, so none is live)."""
    return len(remove_stale_temps(out_dir)) + len(remove_stale_temps(Path(cache_dir) / params.digest()))


def encode_items(items: list[ShardItem], cache_dir: str, params: EncodeParams) -> list[EncodedItem]:
    out = []
    for it in items:
        path, info, _ = ensure_clip(cache_dir, it.key, it.source_path, it.start, it.end, params)
        out.append(EncodedItem(it, str(path), info.width, info.height, info.fps, info.duration, info.bytes))
    return out


_TASK_FIELDS = ("caption", "dense_captions", "grounding", "mcq", "subtitles")


def sample_json(e: EncodedItem) -> dict[str, Any]:
    """docs/DATA_FORMATS.md section 3."""
    it, rec = e.item, e.item.record
    return {
        "key": it.key,
        "clip_id": it.clip_id,
        "video_id": it.video_id,
        "video_sha256": it.video_sha256,
        "source_path": it.source_ref or it.source_path,
        "clip_start": it.start,
        "clip_end": it.end,
        "duration": e.duration,
        "fps": e.fps,
        "width": e.width,
        "height": e.height,
        "split": rec.get("split") or (rec.get("meta") or {}).get("split") or "train",
        **{f: rec.get(f, "" if f == "caption" else []) for f in _TASK_FIELDS},
        "caption_meta": {
            "caption_id": it.caption_id,
            "backend": rec.get("backend"),
            "model": rec.get("model"),
            "prompt_version": rec.get("prompt_version"),
        },
    }


def ensure_shard(out_dir: str, name: str, group: list[EncodedItem]) -> ShardInfo:
    """Write one planned shard of encoded clips unless an identical one is already in place."""
    return shards.ensure_shard(out_dir, name, [(e.item.key, e.mp4, sample_json(e)) for e in group])


def member_rows(group: list[EncodedItem]) -> list[dict[str, Any]]:
    return [{"key": e.item.key, "clip_id": e.item.clip_id, "caption_id": e.item.caption_id} for e in group]
