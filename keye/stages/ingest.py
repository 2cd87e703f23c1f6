"""The ingest stage: hash, probe and split videos into clips; every unreadable input becomes a rejection with a reason.

Workers run `hash_files` and `ingest_videos` and return plain records; the orchestrator dedupes by content and
writes lineage (`plan` / `record` / `finish`). Nothing here raises for a bad video: one broken file must never stop a run over thousands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from keye.core.config import IngestSettings
from keye.core.hashing import settings_hash
from keye.core.lineage import video_id_for
from keye.stages.artifact import StageRun
from keye.stages.sources import FileRef, list_sources


@dataclass
class HashedFile:
    path: str
    source: str
    size: int
    sha256: str | None
    error: str | None = None

    @property
    def video_id(self) -> str:
        return video_id_for(self.sha256, self.path)


@dataclass
class VideoRecord:
    video_id: str
    path: str
    sha256: str | None
    status: str  # 'ok' | 'rejected'
    reason: str | None = None
    duration: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    container: str | None = None
    rotation: int | None = None
    n_video_streams: int | None = None
    n_audio_streams: int | None = None
    bytes: int | None = None
    clips: list[tuple[float, float]] = field(default_factory=list)


def hash_files(files: list[FileRef]) -> list[HashedFile]:
    from keye.core.hashing import sha256_file

    out = []
    for f in files:
        if f.problem:
            out.append(HashedFile(f.path, f.source, -1, None, f.problem))
            continue
        if f.size < 0 or not os.path.exists(f.path):
            out.append(
                HashedFile(f.path, f.source, -1, None, "file not found (listed in the source but missing)")
            )
            continue
        try:
            out.append(HashedFile(f.path, f.source, os.path.getsize(f.path), sha256_file(f.path)))
        except OSError as e:
            out.append(HashedFile(f.path, f.source, f.size, None, f"cannot read the file: {e.strerror or e}"))
    return out


def _rejected(h: HashedFile, reason: str, **probe: object) -> VideoRecord:
    return VideoRecord(h.video_id, h.path, h.sha256, "rejected", reason, bytes=h.size, **probe)  # type: ignore[arg-type]


def ingest_video(h: HashedFile, settings: IngestSettings) -> VideoRecord:
    """Probe one video and cut it into clips at scene changes, or say why it cannot be used."""
    from keye.data.scenes import detect_clips
    from keye.data.video import VideoRejected, probe

    if h.error:
        return _rejected(h, h.error)
    if h.size == 0:
        return _rejected(h, "empty file (0 bytes)")
    try:
        p = probe(h.path, min_duration=settings.min_duration)
    except VideoRejected as e:
        return _rejected(h, str(e))
    except Exception as e:  # an unexpected decoder failure is still a rejection, never a crashed run
        return _rejected(h, f"could not be probed: {type(e).__name__}: {e}")
    info = dict(
        duration=p.duration,
        fps=p.fps,
        width=p.width,
        height=p.height,
        codec=p.codec,
        container=p.container,
        rotation=p.rotation,
        n_video_streams=p.n_video_streams,
        n_audio_streams=p.n_audio_streams,
    )
    try:
        clips = detect_clips(
            h.path,
            max_clip_s=settings.max_clip_seconds,
            min_clip_s=settings.min_clip_seconds,
            threshold=settings.scene_threshold,
            analysis_fps=settings.analysis_fps,
        )
    except VideoRejected as e:
        return _rejected(h, str(e), **info)
    except Exception as e:
        return _rejected(
            h, f"frames could not be decoded while finding scenes: {type(e).__name__}: {e}", **info
        )
    if not clips:
        return _rejected(h, f"no clip of at least {settings.min_clip_seconds:g} s could be cut", **info)
    return VideoRecord(h.video_id, h.path, h.sha256, "ok", None, bytes=h.size, clips=list(clips), **info)


def ingest_videos(files: list[HashedFile], settings: IngestSettings) -> list[VideoRecord]:
    return [ingest_video(h, settings) for h in files]


def dedupe(hashed: list[HashedFile]) -> tuple[list[HashedFile], list[HashedFile]]:
    """Split into (one file per content, extra paths of already-seen content)."""
    first: dict[str, HashedFile] = {}
    extra: list[HashedFile] = []
    for h in sorted(hashed, key=lambda h: h.path):
        if h.sha256 is not None and h.video_id in first:
            extra.append(h)
        else:
            first.setdefault(h.video_id, h)
    return list(first.values()), extra


# -- the stage: plan (dedupe, the VideoSet id, what is left to probe), record, finish ------------------------------
@dataclass
class IngestPlan:
    videoset_id: str
    build: bool  # False: a previous run completed this VideoSet
    todo: list[HashedFile]  # unique contents not yet recorded (a crashed run resumes here)
    extra: list[HashedFile]  # further paths of contents already seen


def list_files(run: StageRun) -> list[FileRef]:
    return list_sources(run.config.sources, run.config.ingest, run.workspace)


def plan(run: StageRun, hashed: list[HashedFile]) -> IngestPlan:
    s = run.config.ingest
    unique, extra = dedupe(hashed)
    vs_id = run.key("vs", sorted(h.video_id for h in unique), settings_hash(s))
    build = run.produce(vs_id, "videoset", "videos", s, [])
    done = set(run.lineage.members(vs_id)) if build else set()
    return IngestPlan(vs_id, build, [h for h in unique if h.video_id not in done] if build else [], extra)


def record(run: StageRun, plan: IngestPlan, records: list[VideoRecord]) -> None:
    run.lineage.record_videos(records, members_of=plan.videoset_id)


def finish(run: StageRun, plan: IngestPlan) -> str:
    if plan.build:
        run.lineage.add_video_paths([(h.video_id, h.path) for h in plan.extra])
        run.lineage.complete_artifact(plan.videoset_id)
    run.summary.update(run.lineage.videoset_summary(plan.videoset_id))
    run.summary["duplicate_paths"] = len(plan.extra)
    return plan.videoset_id
