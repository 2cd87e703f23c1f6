"""Ingest flow: scan sources, hash, dedupe by content, probe and cut clips; rejections are recorded, never fatal."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.runners import batched
from keye.core.config import IngestSettings, PipelineConfig
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import make_id
from keye.core.progress import progress
from keye.stages import ingest as ing
from keye.stages.artifact import ParentRun, open_stage
from keye.stages.sources import FileRef, list_sources


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=2, retry_delay_seconds=1)
def hash_files(files: list[FileRef]) -> list[ing.HashedFile]:
    return ing.hash_files(files)


@task(retries=1, retry_delay_seconds=1)
def ingest_videos(files: list[ing.HashedFile], settings: IngestSettings) -> list[ing.VideoRecord]:
    return ing.ingest_videos(files, settings)


@flow(name="ingest")
def ingest(config: PipelineConfig, parent: ParentRun | None = None) -> str:
    """Returns the VideoSet id."""
    with open_stage(config, "ingest", parent, flow_run.id) as ctx:
        s = config.ingest
        files = list_sources(config.sources, s, ctx.workspace)
        hashed = [h for f in [hash_files.submit(b) for b in batched(files, 64)] for h in f.result()]
        unique, extra = ing.dedupe(hashed)
        video_ids = sorted(h.video_id for h in unique)
        vs_id = make_id("vs", video_ids, settings_hash(s), code_hash("flows.ingest"))
        ctx.outputs.append(vs_id)
        if not ctx.cached(vs_id):
            ctx.lineage.begin_artifact(vs_id, "videoset", "videos", settings_hash(s), [])
            done = set(ctx.lineage.members(vs_id))  # a crashed run of this same VideoSet resumes here
            todo = [h for h in unique if h.video_id not in done]
            futures = [ingest_videos.submit(b, s) for b in batched(todo, s.batch_size)]
            with progress("ingest: probing videos", total=len(todo)) as bar:
                for fut in as_completed(futures):
                    records = fut.result()
                    ctx.lineage.record_videos(records, members_of=vs_id)
                    bar.advance(len(records))
            ctx.lineage.add_video_paths([(h.video_id, h.path) for h in extra])
            ctx.lineage.complete_artifact(vs_id)
        ctx.summary.update(ctx.lineage.videoset_summary(vs_id))
        ctx.summary["duplicate_paths"] = len(extra)
        return vs_id
