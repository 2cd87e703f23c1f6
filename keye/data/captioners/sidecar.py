"""The ``sidecar`` captioner: captions from annotation files that sit next to the videos (no model).

Looks for ``<stem>.json`` (docs/DATA_FORMATS.md section 1, written by the synthetic generator or by a user),
then ``<stem>.srt`` / ``<stem>.vtt`` (subtitle cues become dense captions), then ``<stem>.txt`` (one caption for the
whole video), in an optional annotations directory first and then beside the video.

Clip rules (why: a clip's record must only claim what happens inside the clip):
- dense captions, grounding spans and MCQs (by their evidence interval) are kept when they lie inside [start, end]
  (with a small tolerance), subtitles when they overlap it (cut to it); all times are shifted to clip time.
- the clip caption is the video caption when the clip covers almost the whole video (``whole_video_fraction``),
  else it is composed from the dense captions inside the clip, in time order.
- a clip with neither gets an error record (see ``base``), never a caption that describes other parts of the video.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.data.captioners.base import CaptionRecord, ClipRef

SCHEMA_PREFIX = "keye.annotations/"
EXTENSIONS = (".json", ".srt", ".vtt", ".txt")


class AnnotationError(ValueError):
    """An annotation file that exists but cannot be used (the reason is the message)."""


@dataclass
class Annotations:
    """One video's annotations, times in seconds from the video start."""

    source: Path
    kind: str  # json | srt | vtt | txt
    caption: str | None = None
    duration: float | None = None
    split: str | None = None
    dense_captions: list[dict[str, Any]] = field(default_factory=list)
    grounding: list[dict[str, Any]] = field(default_factory=list)
    mcq: list[dict[str, Any]] = field(default_factory=list)
    subtitles: list[dict[str, Any]] = field(default_factory=list)
    skipped_items: int = 0


# ---------------------------------------------------------------------------------------------------- subtitles
_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_CUE = re.compile(_TIME + r"\s*-->\s*" + _TIME)
_TAG = re.compile(r"<[^>]*>|\{\\[^}]*\}")


def _seconds(h: str | None, m: str, s: str, frac: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000.0


def parse_subtitles(text: str) -> list[dict[str, Any]]:
    """Cues of an SRT or WebVTT file as [{start, end, text}] (tags and entities removed, lines joined).

    Blocks without a ``-->`` timing line (the WEBVTT header, NOTE/STYLE/REGION blocks, stray text) are ignored.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    cues: list[dict[str, Any]] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n")]
        for i, line in enumerate(lines):
            m = _CUE.search(line)
            if m is None:
                continue
            start, end = _seconds(*m.groups()[:4]), _seconds(*m.groups()[4:])
            body = " ".join(html.unescape(_TAG.sub("", ln)).strip() for ln in lines[i + 1 :])
            body = re.sub(r"\s+", " ", body).strip()
            if body and end >= start:
                cues.append({"start": round(start, 3), "end": round(end, 3), "text": body})
            break
    cues.sort(key=lambda c: (c["start"], c["end"]))
    return cues


# ---------------------------------------------------------------------------------------------------- loading
def find_annotation(video_path: str | Path, annotations_dir: str | Path | None = None) -> Path | None:
    """The annotation file for a video, by extension priority, in ``annotations_dir`` first, then beside it."""
    video = Path(video_path)
    dirs = [Path(annotations_dir)] if annotations_dir else []
    dirs.append(video.parent)
    for d in dirs:
        for ext in EXTENSIONS:
            p = d / f"{video.stem}{ext}"
            if p.is_file() and p.resolve() != video.resolve():
                return p
    return None


def _span(d: dict[str, Any]) -> tuple[float, float]:
    s, e = float(d["start"]), float(d["end"])
    if not (math.isfinite(s) and math.isfinite(e)) or e < s:
        raise ValueError("bad span")
    return s, e


def _valid(items: Any, check: Any) -> tuple[list[dict[str, Any]], int]:
    good, bad = [], 0
    for d in items if isinstance(items, list) else []:
        try:
            check(d)
            good.append(d)
        except (KeyError, TypeError, ValueError, IndexError):
            bad += 1
    return good, bad


def _check_text_span(d: dict[str, Any]) -> None:
    _span(d)
    if not str(d["text"]).strip():
        raise ValueError("empty text")


def _check_grounding(d: dict[str, Any]) -> None:
    _span(d)
    if not str(d["query"]).strip():
        raise ValueError("empty query")


def _check_mcq(d: dict[str, Any]) -> None:
    opts = d["options"]
    if not isinstance(opts, list) or len(opts) < 2 or not 0 <= int(d["answer"]) < len(opts):
        raise ValueError("bad options/answer")
    if not str(d["question"]).strip():
        raise ValueError("empty question")
    if "start" in d or "end" in d:
        _span(d)


def load_annotations(path: str | Path) -> Annotations:
    """Parse one annotation file; raises AnnotationError with a readable reason when it is unusable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"cannot read annotation file {p.name}: {e}") from None
    kind = p.suffix.lower().lstrip(".")
    if kind in ("srt", "vtt"):
        cues = parse_subtitles(text)
        if not cues:
            raise AnnotationError(f"subtitle file {p.name} has no timed cue")
        return Annotations(p, kind, dense_captions=cues)
    if kind == "txt":
        caption = re.sub(r"\s+", " ", text).strip()
        if not caption:
            raise AnnotationError(f"caption file {p.name} is empty")
        return Annotations(p, kind, caption=caption)
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise AnnotationError(f"annotation file {p.name} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise AnnotationError(f"annotation file {p.name} must hold a JSON object")
    schema = obj.get("schema")
    if schema is not None and not str(schema).startswith(SCHEMA_PREFIX):
        raise AnnotationError(f"annotation file {p.name} has schema {schema!r}, expected {SCHEMA_PREFIX}v1")
    dense, b1 = _valid(obj.get("dense_captions"), _check_text_span)
    grounding, b2 = _valid(obj.get("grounding"), _check_grounding)
    mcq, b3 = _valid(obj.get("mcq"), _check_mcq)
    subs, b4 = _valid(obj.get("subtitles"), _check_text_span)
    caption = obj.get("caption")
    caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
    duration = obj.get("duration")
    duration = float(duration) if isinstance(duration, int | float) and duration > 0 else None
    if caption is None and not dense:
        raise AnnotationError(f"annotation file {p.name} has neither a caption nor dense captions")
    return Annotations(
        p,
        "json",
        caption=caption,
        duration=duration,
        split=obj.get("split") if isinstance(obj.get("split"), str) else None,
        dense_captions=dense,
        grounding=grounding,
        mcq=mcq,
        subtitles=subs,
        skipped_items=b1 + b2 + b3 + b4,
    )


def video_duration(path: str | Path) -> float | None:
    """Container duration in seconds (header only, no decoding); None when unknown."""
    import av

    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0] if c.streams.video else None
            if st is not None and st.duration and st.time_base:
                return float(st.duration * st.time_base)
            return c.duration / av.time_base if c.duration else None
    except (av.error.FFmpegError, OSError):
        return None


# ---------------------------------------------------------------------------------------------------- clip rules
def _shift(s: float, e: float, start: float, end: float) -> tuple[float, float]:
    length = end - start
    return round(min(max(s - start, 0.0), length), 3), round(min(max(e - start, 0.0), length), 3)


def restrict_to_clip(
    ann: Annotations, start: float, end: float, tol: float = 0.05
) -> dict[str, list[dict[str, Any]]]:
    """The annotation items that belong to the clip [start, end], in clip time (rules in the module docstring)."""
    full = ann.duration if ann.duration is not None else math.inf

    def inside(s: float, e: float) -> bool:
        return s >= start - tol and e <= end + tol

    out: dict[str, list[dict[str, Any]]] = {"dense_captions": [], "grounding": [], "mcq": [], "subtitles": []}
    for d in ann.dense_captions:
        s, e = _span(d)
        if inside(s, e):
            cs, ce = _shift(s, e, start, end)
            out["dense_captions"].append({**d, "start": cs, "end": ce, "text": str(d["text"]).strip()})
    for g in ann.grounding:
        s, e = _span(g)
        if inside(s, e):
            cs, ce = _shift(s, e, start, end)
            out["grounding"].append({**g, "start": cs, "end": ce})
    for q in ann.mcq:
        s, e = _span(q) if ("start" in q or "end" in q) else (0.0, full)
        if inside(s, e):
            cs, ce = _shift(s, e, start, end)
            out["mcq"].append({**q, "start": cs, "end": ce})
    for sub in ann.subtitles:
        s, e = _span(sub)
        if s < end and e > start:
            cs, ce = _shift(s, e, start, end)
            out["subtitles"].append({**sub, "start": cs, "end": ce})
    for items in out.values():
        items.sort(key=lambda d: (d["start"], d["end"]))
    return out


def compose_caption(dense: list[dict[str, Any]]) -> str:
    """One paragraph from dense captions in time order: 'A happens. Then b happens.' (duplicates dropped)."""
    sentences: list[str] = []
    for d in sorted(dense, key=lambda d: (d["start"], d["end"])):
        t = str(d["text"]).strip().rstrip(".")
        if not t or (sentences and t.lower() == sentences[-1].lower()):
            continue
        sentences.append(t)
    parts = [
        (s[0].upper() + s[1:]) if i == 0 else "Then " + (s[0].lower() + s[1:])
        for i, s in enumerate(sentences)
    ]
    return " ".join(p + "." for p in parts)


# ---------------------------------------------------------------------------------------------------- captioner
class SidecarCaptioner:
    """Captions from annotation files; ``prompt_version`` names the version of the clip rules above."""

    name = "sidecar"

    def __init__(
        self,
        annotations_dir: str | None = None,
        whole_video_fraction: float = 0.9,
        tolerance_s: float = 0.05,
        model: str = "sidecar",
        prompt_version: str = "v1",
    ) -> None:
        if not 0 < whole_video_fraction <= 1:
            raise ValueError("whole_video_fraction must be in (0, 1]")
        self.annotations_dir = annotations_dir
        self.whole_video_fraction = whole_video_fraction
        self.tolerance_s = tolerance_s
        self.model = model
        self.prompt_version = prompt_version

    def caption(self, clips: list[ClipRef]) -> list[CaptionRecord]:
        cache: dict[str, Annotations | str] = {}
        return [self._one(clip, cache) for clip in clips]

    def _fail(self, clip: ClipRef, reason: str) -> CaptionRecord:
        return CaptionRecord.failed(clip, self.name, self.model, self.prompt_version, reason)

    def _annotations(self, clip: ClipRef, cache: dict[str, Annotations | str]) -> Annotations | str:
        if clip.video_path not in cache:
            path = find_annotation(clip.video_path, self.annotations_dir)
            if path is None:
                stem = Path(clip.video_path).stem
                where = (
                    f"in {self.annotations_dir} and beside the video"
                    if self.annotations_dir
                    else "beside the video"
                )
                looked = "/".join(stem + ext for ext in EXTENSIONS)
                cache[clip.video_path] = (
                    f"no annotation file for {Path(clip.video_path).name} (looked for {looked} {where})"
                )
            else:
                try:
                    ann = load_annotations(path)
                    if ann.duration is None:  # needed for whole-video captions and whole-video MCQs
                        ann.duration = video_duration(clip.video_path)
                    cache[clip.video_path] = ann
                except AnnotationError as e:
                    cache[clip.video_path] = str(e)
        return cache[clip.video_path]

    def _one(self, clip: ClipRef, cache: dict[str, Annotations | str]) -> CaptionRecord:
        ann = self._annotations(clip, cache)
        if isinstance(ann, str):
            return self._fail(clip, ann)
        if not clip.end > clip.start:
            return self._fail(clip, f"clip [{clip.start}, {clip.end}] is empty")
        items = restrict_to_clip(ann, clip.start, clip.end, self.tolerance_s)
        covers = ann.duration is not None and clip.duration >= self.whole_video_fraction * ann.duration
        if ann.caption is not None and covers:
            caption, how = ann.caption, "video caption"
        elif items["dense_captions"]:
            caption, how = compose_caption(items["dense_captions"]), "composed from dense captions"
        else:
            share = f"{clip.duration / ann.duration:.0%} of the video" if ann.duration else "an unknown share"
            why = (
                f"the clip covers {share}, so the video caption would not describe it"
                if ann.caption is not None
                else "there is no video caption"
            )
            return self._fail(
                clip,
                f"no dense caption of {ann.source.name} lies inside clip [{clip.start:.2f}, {clip.end:.2f}] s "
                f"and {why}",
            )
        meta: dict[str, Any] = {"source": str(ann.source), "source_kind": ann.kind, "caption_from": how}
        if ann.split is not None:
            meta["split"] = ann.split
        if ann.skipped_items:
            meta["skipped_malformed_items"] = ann.skipped_items
        return CaptionRecord(
            clip.clip_id, self.name, self.model, self.prompt_version, caption=caption, meta=meta, **items
        )
