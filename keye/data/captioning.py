"""Captioning a batch of clips with a captioner backend: caption ids, per-clip failures as rows (keye.stages.caption
picks the clips and records the rows).

A clip whose captioner fails (no annotation, a server error after all retries) becomes a caption row with status
'failed' and the reason; the shard stage takes only 'ok' captions, and a later run retries nothing that succeeded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keye.data.captioners import ClipRef, build_captioner
from keye.data.captioners.base import CaptionRecord

__all__ = [
    "ClipRef",
    "captioner_identity",
    "caption_id_for",
    "caption_batch",
]


def captioner_identity(backend: dict[str, Any]) -> dict[str, str]:
    cap = build_captioner(backend)
    return {"backend": cap.name, "model": cap.model, "prompt_version": cap.prompt_version}


def caption_id_for(clip_id: str, ident: dict[str, str]) -> str:
    """The id CaptionRecord itself carries, known before captioning so finished clips can be skipped."""
    return CaptionRecord(clip_id, ident["backend"], ident["model"], ident["prompt_version"]).caption_id


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
