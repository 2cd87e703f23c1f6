"""The shard stage: which captioned clips go in, the ShardSet id, the shard plan, shard rows in lineage.

Work is split so a crash loses little: clips are encoded into a cache (atomic, skipped when present), then shards
are planned by actual size and each is written atomically and recorded in lineage as soon as it exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.core.hashing import settings_hash
from keye.core.lineage import Lineage, make_id
from keye.data.shard_samples import EncodedItem, ShardItem, member_rows, remove_partial_files
from keye.data.shards import EncodeParams, ShardInfo, clip_key, plan_shards, shard_name
from keye.stages.artifact import StageRun


@dataclass
class ShardPlan:
    shardset_id: str
    build: bool  # False: a previous run completed this ShardSet
    out_dir: str
    cache_dir: str  # encoded clips, shared by every ShardSet with the same encode settings
    params: EncodeParams
    items: list[ShardItem] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def shard_items(lineage: Lineage, captionset_id: str) -> list[ShardItem]:
    """Clips with an 'ok' caption in the caption set, in key order."""
    items = [
        ShardItem(
            key=clip_key(r["clip_id"]),
            clip_id=r["clip_id"],
            caption_id=r["caption_id"],
            video_id=r["video_id"],
            video_sha256=r["sha256"],
            source_path=r["path"],
            source_ref=portable_path(r["path"], lineage.workspace.root),
            start=r["start_s"],
            end=r["end_s"],
            record=json.loads(r["record"]) if isinstance(r["record"], str) else (r["record"] or {}),
        )
        for r in lineage.captioned_clip_rows(captionset_id)
    ]
    return sorted(items, key=lambda i: i.key)


def portable_path(path: str, root: Path) -> str:
    """`path` relative to the workspace root when it lies inside it, else as given: two workspaces built from
    the same sources then write the same bytes."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def shard_id_for(shardset_id: str, name: str) -> str:
    return make_id("s", shardset_id, name)


def plan(run: StageRun, captionset_id: str | None) -> ShardPlan:
    s = run.config.shard
    captionset_id = run.input("captionset", captionset_id)
    ss_id = run.key("ss", captionset_id, settings_hash(s))
    out_dir = run.workspace.shards / ss_id
    build = run.produce(ss_id, "shardset", s.prefix, s, [captionset_id], path=str(out_dir))
    params = EncodeParams(max_side=s.max_side, fps=s.fps, gop_seconds=s.gop_seconds)
    p = ShardPlan(ss_id, build, str(out_dir), str(run.workspace.cache / "clips"), params)
    if build:
        p.items = shard_items(run.lineage, captionset_id)
        run.summary["partial_files_removed"] = remove_partial_files(out_dir, p.cache_dir, params)
    return p


def group(run: StageRun, plan: ShardPlan, encoded: list[EncodedItem]) -> list[tuple[str, list[EncodedItem]]]:
    """(shard name, its clips): planned by the encoded sizes, about target_bytes each, in key order."""
    s = run.config.shard
    by_key = {e.item.key: e for e in encoded}
    groups = plan_shards([(k, e.bytes) for k, e in by_key.items()], s.target_bytes)
    plan.names = [shard_name(s.prefix, i) for i in range(len(groups))]
    return [(n, [by_key[k] for k in keys]) for n, keys in zip(plan.names, groups, strict=True)]


def record(run: StageRun, plan: ShardPlan, call: tuple[str, str, list[EncodedItem]], info: ShardInfo) -> None:
    """One shard written by `write_shard(out_dir, name, group)` (the call) goes into lineage at once."""
    _, name, group = call
    row: dict[str, Any] = {
        "shard_id": shard_id_for(plan.shardset_id, name),
        "path": str(info.path),
        "sha256": info.sha256,
        "n_samples": info.n_samples,
        "bytes": info.bytes,
    }
    run.lineage.record_shard(plan.shardset_id, row, member_rows(group))


def finish(run: StageRun, plan: ShardPlan) -> str:
    if plan.build:
        members = [shard_id_for(plan.shardset_id, n) for n in plan.names]
        run.lineage.complete_artifact(plan.shardset_id, members=members)
    rows = run.lineage.shards(plan.shardset_id)
    run.summary.update(
        shards=len(rows),
        shard_samples=sum(r["n_samples"] for r in rows),
        shard_bytes=sum(r["bytes"] for r in rows),
    )
    return plan.shardset_id
