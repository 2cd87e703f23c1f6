"""The caption stage: which clips of a VideoSet still need a caption, the CaptionSet id, the rows recorded.

A clip whose captioner fails becomes a row with status 'failed' and the reason (keye.data.captioning); the shard
stage takes only 'ok' captions, and a later run retries nothing that succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keye.core.hashing import settings_hash
from keye.core.lineage import Lineage
from keye.data.captioning import ClipRef, caption_id_for, captioner_identity
from keye.stages.artifact import StageRun


@dataclass
class CaptionPlan:
    captionset_id: str
    build: bool  # False: a previous run completed this CaptionSet
    backend: dict[str, Any]  # {"backend": name, **options}: what a worker builds its captioner from
    backend_name: str
    todo: list[ClipRef] = field(default_factory=list)  # clips without a caption yet
    alternatives: dict[str, list[str]] = field(default_factory=dict)  # clip_id -> other paths of its video
    caption_ids: list[str] = field(default_factory=list)  # every member of the set, sorted


def clip_refs(lineage: Lineage, videoset_id: str) -> list[ClipRef]:
    return [
        ClipRef(
            clip_id=r["clip_id"],
            video_path=r["path"],
            start=r["start_s"],
            end=r["end_s"],
            fps=r["fps"],
            width=r["width"],
            height=r["height"],
            video_id=r["video_id"],
        )
        for r in lineage.clip_rows(videoset_id)
    ]


def other_paths(lineage: Lineage, clips: list[ClipRef]) -> dict[str, list[str]]:
    """clip_id -> further paths of the same content (a copy elsewhere may be the one with annotations beside it)."""
    paths = lineage.paths_of_videos([c.video_id for c in clips])
    return {c.clip_id: [p for p in paths.get(c.video_id, []) if p != c.video_path] for c in clips}


def plan(run: StageRun, videoset_id: str | None) -> CaptionPlan:
    s = run.config.caption
    videoset_id = run.input("videoset", videoset_id)
    backend = {"backend": s.backend, **s.options}
    ident = captioner_identity(backend)
    cs_id = run.key("cs", videoset_id, settings_hash(s))
    p = CaptionPlan(cs_id, run.produce(cs_id, "captionset", ident["backend"], s, [videoset_id]), backend, "")
    p.backend_name = ident["backend"]
    if p.build:
        clips = clip_refs(run.lineage, videoset_id)
        ids = {c.clip_id: caption_id_for(c.clip_id, ident) for c in clips}
        done = run.lineage.existing_ids("captions", "caption_id", list(ids.values()))
        p.todo = [c for c in clips if ids[c.clip_id] not in done]
        p.alternatives = other_paths(run.lineage, p.todo)
        p.caption_ids = sorted(ids.values())
    return p


def record(run: StageRun, rows: list[dict[str, Any]]) -> None:
    run.lineage.record_captions(rows)


def summary(lineage: Lineage, captionset_id: str) -> dict[str, Any]:
    counts = lineage.caption_counts(captionset_id)
    return {"captions_ok": counts.get("ok", 0), "captions_failed": counts.get("failed", 0)}


def finish(run: StageRun, plan: CaptionPlan) -> str:
    if plan.build:
        run.lineage.complete_artifact(plan.captionset_id, members=plan.caption_ids)
    run.summary.update(summary(run.lineage, plan.captionset_id))
    return plan.captionset_id
