"""Eval flow: the held-out split as TimeLens / Video-MME / Video-MME-v2 / LongVideoBench files, answered by a
checkpoint; metrics, predictions and an HTML report go to MLflow, the checkpoint to the model registry."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from keye.core.checkpoint_hash import hash_checkpoint_dir
from keye.core.config import PipelineConfig
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import make_id
from keye.core.tracking import register_checkpoint
from keye.eval import flat_metrics, keye_predict_fn, write_report
from keye.eval.heldout import (
    blank_frame_control,
    control_metrics,
    describe_control,
    heldout_benchmarks,
    run_benchmarks,
    vision_control_path,
)
from keye.stages.artifact import ParentRun, open_stage


@flow(name="eval")
def evaluate(
    config: PipelineConfig,
    checkpoint_dir: str,
    videoset_id: str | None = None,
    parent: ParentRun | None = None,
) -> str:
    """Returns the eval id; the report is <workspace>/reports/<id>/report.html."""
    with open_stage(config, "eval", parent, flow_run.id) as ctx:
        videoset_id = videoset_id or ctx.lineage.latest_artifact("videoset")  # run alone: the newest one
        s = config.eval
        ckpt_sha = hash_checkpoint_dir(checkpoint_dir)
        ckpt_id = ctx.lineage.checkpoint_id_for(checkpoint_dir, ckpt_sha)
        eval_id = make_id("e", ckpt_sha, videoset_id, settings_hash(s), code_hash("flows.evaluate"))
        ctx.inputs += [ckpt_id, videoset_id]
        ctx.outputs.append(eval_id)
        out = ctx.workspace.reports / eval_id
        done = ctx.lineage.evals_of(eval_id)
        if not done:
            videos = [
                v["path"]
                for v in ctx.lineage.videos("ok")
                if v["video_id"] in set(ctx.lineage.members(videoset_id))
            ]
            sets = heldout_benchmarks(videos, out / "benchmarks", split=s.split)
            predict = keye_predict_fn(checkpoint_dir, device=s.device, max_new_tokens=s.max_new_tokens)
            results = run_benchmarks(predict, sets, out, s.batch_size, s.limit)
            notes = {"checkpoint": str(checkpoint_dir), "videoset": videoset_id}
            if s.blank_control:
                control = blank_frame_control(
                    predict, sets, results, vision_control_path(out).parent, s.batch_size, s.limit
                )
                notes["blank-frame control"] = describe_control(control)
            previous = ctx.lineage.previous_eval_metrics(ckpt_id, list(results))
            write_report(
                {k: v for k, v in results.items()},
                out,
                previous=previous,
                predictions={k: v["_predictions"] for k, v in results.items()},
                notes=notes,
            )
            ctx.lineage.record_evals(eval_id, ckpt_id, results, str(out))
            done = ctx.lineage.evals_of(eval_id)
        metrics = {row["bench"]: json.loads(row["metrics"]) for row in done}
        for name, m in metrics.items():
            ctx.tracker.log_metrics(
                flat_metrics({k: v for k, v in m.items() if not k.startswith("_")}, f"{name}/")
            )
        control_path = vision_control_path(out)
        if s.blank_control and control_path.is_file():
            control = json.loads(control_path.read_text(encoding="utf-8"))
            ctx.tracker.log_metrics(control_metrics(control))
        ctx.tracker.log_artifact(out)
        headline = sum(float(m[m["primary"]]) for m in metrics.values()) / max(len(metrics), 1)
        reg = register_checkpoint(ctx.tracker, Path(checkpoint_dir), s.registered_model, headline, s.alias)
        ctx.summary.update(
            eval_score=headline,
            registered_version=reg["version"],
            report=str(out / "report.html"),
            **{f"{k}_{m['primary']}": m[m["primary"]] for k, m in metrics.items()},
        )
        return eval_id
