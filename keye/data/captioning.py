"""The caption stage around a captioner backend: which clips to caption, caption ids, per-clip failures as rows.

A clip whose captioner fails (no annotation, a server error after all retries) becomes a caption row with status
'failed' and the reason; the shard stage takes only 'ok' captions, and a later run retries nothing that succeeded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keye.core.config import CaptionSettings
from keye.core.lineage import Lineage
from keye.data.captioners import ClipRef, build_captioner
from keye.data.captioners.base import CaptionRecord

__all__ = [
    "ClipRef",
    "backend_config",
    "captioner_identity",
    "caption_id_for",
    "clip_refs",
    "caption_batch",
    "summary",
]


def backend_config(settings: CaptionSettings) -> dict[str, Any]:
    return {"backend": settings.backend, **settings.options}


def captioner_identity(backend: dict[str, Any]) -> dict[str, str]:
    cap = build_captioner(backend)
    return {"backend": cap.name, "model": cap.model, "prompt_version": cap.prompt_version}


def caption_id_for(clip_id: str, ident: dict[str, str]) -> str:
    """The id CaptionRecord itself carries, known before captioning so finished clips can be skipped."""
    return CaptionRecord(clip_id, ident["backend"], ident["model"], ident["prompt_version"]).caption_id


def other_paths(lineage: Lineage, clips: list[ClipRef]) -> dict[str, list[str]]:
    """clip_id -> further paths of the same content (a copy elsewhere may be the one with annotations beside it)."""
    rows = lineage.query(
        """SELECT video_id, list(path ORDER BY path) AS paths FROM video_paths
           WHERE video_id IN (SELECT unnest(?)) GROUP BY video_id""",
        [sorted({c.video_id for c in clips})],
    )
    paths = {r["video_id"]: r["paths"] for r in rows}
    return {c.clip_id: [p for p in paths.get(c.video_id, []) if p != c.video_path] for c in clips}


def clip_refs(lineage: Lineage, videoset_id: str) -> list[ClipRef]:
    rows = lineage.query(
        """SELECT c.clip_id, c.video_id, c.start_s, c.end_s, v.path, v.fps, v.width, v.height
           FROM clips c JOIN videos v USING (video_id)
           WHERE c.clip_id IN (SELECT member_id FROM set_members WHERE set_id = ?) AND c.status = 'ok'
           ORDER BY c.video_id, c.idx""",
        [videoset_id],
    )
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
        for r in rows
    ]


def _row(
    clip: ClipRef, ident: dict[str, str], record: dict[str, Any] | None, reason: str | None
) -> dict[str, Any]:
    return {
        "caption_id": caption_id_for(clip.clip_id, ident),
        "clip_id": clip.clip_id,
        **ident,
        "status": "ok" if reason is None else "failed",
        "reason": reason,
        "caption": (record or {}).get("caption"),
        "record": record,
    }


def caption_batch(
    clips: list[ClipRef], backend: dict[str, Any], alternatives: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """Caption a batch. A clip that fails is tried again from the other paths of the same video, if any.

    Per-clip problems come back as records with `error` (see keye.data.captioners.base); a CaptionerError (the
    backend itself is broken) propagates so the Prefect task fails and is retried.
    """
    cap = build_captioner(backend)
    ident = {"backend": cap.name, "model": cap.model, "prompt_version": cap.prompt_version}
    records = [_as_record(r) for r in cap.caption(clips)]
    rows = []
    for clip, rec in zip(clips, records, strict=True):
        reason = _failure(rec)
        for alt in (alternatives or {}).get(clip.clip_id, []) if reason else []:
            (retry,) = cap.caption([dataclasses.replace(clip, video_path=alt)])
            if _failure(_as_record(retry)) is None:
                rec, reason = _as_record(retry), None
                break
        rows.append(_row(clip, ident, rec, reason))
    return rows


def _as_record(rec: Any) -> dict[str, Any] | None:
    if rec is None:
        return None
    if hasattr(rec, "to_dict"):
        return rec.to_dict()
    if dataclasses.is_dataclass(rec):
        return dataclasses.asdict(rec)
    return dict(rec)


def _failure(rec: Any) -> str | None:
    d = _as_record(rec) or {}
    if d.get("error"):
        return str(d["error"])
    if not d.get("caption"):
        return "the captioner returned no caption"
    return None


def summary(lineage: Lineage, captionset_id: str) -> dict[str, Any]:
    rows = lineage.query(
        """SELECT status, count(*) AS n FROM captions
           WHERE caption_id IN (SELECT member_id FROM set_members WHERE set_id = ?) GROUP BY status""",
        [captionset_id],
    )
    counts = {r["status"]: r["n"] for r in rows}
    return {"captions_ok": counts.get("ok", 0), "captions_failed": counts.get("failed", 0)}
