"""Ingest flow: scan sources, hash, dedupe by content, probe and cut clips; rejections are recorded, never fatal."""

from __future__ import annotations

from functools import partial

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run

from flows.artifacts import publish_stage
from flows.submit import run_batches
from keye.core.config import IngestSettings, PipelineConfig
from keye.stages import ingest as stage
from keye.stages.artifact import ParentRun, open_stage
from keye.stages.sources import FileRef


@task(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, retries=2, retry_delay_seconds=1)
def hash_files(files: list[FileRef]) -> list[stage.HashedFile]:
    return stage.hash_files(files)


@task(retries=1, retry_delay_seconds=1)
def ingest_videos(files: list[stage.HashedFile], settings: IngestSettings) -> list[stage.VideoRecord]:
    return stage.ingest_videos(files, settings)


@flow(name="ingest")
def ingest(config: PipelineConfig, parent: ParentRun | None = None) -> str:
    """Returns the VideoSet id."""
    with open_stage(config, "ingest", parent, flow_run.id) as run:
        files = stage.list_files(run)
        plan = stage.plan(run, run_batches(hash_files, files, 64, "ingest: hashing"))
        record = partial(stage.record, run, plan)
        s = config.ingest
        run_batches(ingest_videos, plan.todo, s.batch_size, "ingest: probing videos", s, on_result=record)
        return publish_stage(run, stage.finish(run, plan))
