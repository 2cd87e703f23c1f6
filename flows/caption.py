"""Caption flow: one caption record per clip from the configured backend; clips already captioned are skipped."""

from __future__ import annotations

from prefect import flow, task
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.runners import batched
from keye.core.config import PipelineConfig
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import make_id
from keye.core.progress import progress
from keye.data import captioning
from keye.stages.artifact import ParentRun, open_stage


@task(retries=2, retry_delay_seconds=2)
def caption_clips(
    clips: list[captioning.ClipRef], backend: dict, alternatives: dict[str, list[str]]
) -> list[dict]:
    return captioning.caption_batch(clips, backend, alternatives)


@flow(name="caption")
def caption(config: PipelineConfig, videoset_id: str | None = None, parent: ParentRun | None = None) -> str:
    """Returns the CaptionSet id."""
    with open_stage(config, "caption", parent, flow_run.id) as ctx:
        videoset_id = videoset_id or ctx.lineage.latest_artifact("videoset")  # run alone: the newest one
        backend = captioning.backend_config(config.caption)
        ident = captioning.captioner_identity(backend)
        cs_id = make_id("cs", videoset_id, settings_hash(config.caption), code_hash("flows.caption"))
        ctx.inputs.append(videoset_id)
        ctx.outputs.append(cs_id)
        if not ctx.cached(cs_id):
            ctx.lineage.begin_artifact(
                cs_id, "captionset", ident["backend"], settings_hash(config.caption), [videoset_id]
            )
            clips = captioning.clip_refs(ctx.lineage, videoset_id)
            ids = {c.clip_id: captioning.caption_id_for(c.clip_id, ident) for c in clips}
            done = ctx.lineage.existing_ids("captions", "caption_id", list(ids.values()))
            todo = [c for c in clips if ids[c.clip_id] not in done]
            alts = captioning.other_paths(ctx.lineage, todo)
            futures = [
                caption_clips.submit(b, backend, {c.clip_id: alts[c.clip_id] for c in b})
                for b in batched(todo, config.caption.batch_size)
            ]
            with progress(f"caption ({ident['backend']})", total=len(todo)) as bar:
                for fut in as_completed(futures):
                    rows = fut.result()
                    ctx.lineage.record_captions(rows)
                    bar.advance(len(rows))
            ctx.lineage.complete_artifact(cs_id, members=sorted(ids.values()))
        ctx.summary.update(captioning.summary(ctx.lineage, cs_id))
        return cs_id
