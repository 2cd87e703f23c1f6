"""The eval stage: the held-out split as TimeLens / Video-MME / Video-MME-v2 / LongVideoBench files, answered by a
checkpoint; metrics, predictions and an HTML report go to MLflow, the checkpoint to the model registry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from keye.core.atomic import atomic_write_json
from keye.core.hashing import hash_checkpoint_dir, settings_hash
from keye.core.lineage import AGENT_EVAL_FILE, BRANCH_STAGES
from keye.core.tracking import best_version, register_checkpoint, stage_curves
from keye.data.frame_cache import FrameCache
from keye.eval import flat_metrics, keye_predict_fn, write_report
from keye.eval.compare import compare_results, comparison_metrics, describe
from keye.eval.export import write_heldout_benchmarks
from keye.eval.heldout import (
    BenchSet,
    blank_frame_control,
    control_metrics,
    describe_control,
    heldout_benchmarks,
    run_benchmarks,
    vision_control_path,
)
from keye.stages.artifact import StageRun
from keye.stages.sources import materialise_probe

POST_TRAINING_STAGES = (
    "video_rl",
    "mopd",
)  # checkpoints compared with the one they started from (eval.compare_parent)
COMPARISON_FILE = "comparison.json"


@dataclass
class EvalPlan:
    eval_id: str
    build: bool  # False: this checkpoint was already evaluated on this VideoSet with these settings
    checkpoint_dir: str
    checkpoint_id: str
    videoset_id: str
    out_dir: Path
    baseline: EvalPlan | None = None  # the checkpoint it was post-trained from, evaluated the same way
    # the agent_rl branch's held-out agent comparison, reported beside the benchmarks
    agent_eval: Path | None = None
    # decoded frames, shared with the baseline's eval: both ask the same questions of the same videos
    frames: FrameCache = field(default_factory=lambda: FrameCache(max_bytes=512 << 20))

    def todo(self) -> list[EvalPlan]:
        """The evaluations still to run, the baseline first (the report of this one compares with it)."""
        return [p for p in (self.baseline, self) if p is not None and p.build]


def _one(
    run: StageRun, checkpoint_dir: str, videoset_id: str, agent: tuple[str, str] | None = None
) -> EvalPlan:
    """`agent`: (id, sha256) of an agent_rl checkpoint whose comparison this eval's report carries (part of its key)."""
    sha = hash_checkpoint_dir(checkpoint_dir)
    ckpt_id = run.lineage.checkpoint_id_for(checkpoint_dir, sha)
    eval_id = run.key("e", sha, videoset_id, settings_hash(run.config.eval), *([agent[1]] if agent else []))
    run.inputs += [i for i in (ckpt_id, videoset_id) if i not in run.inputs]
    if eval_id not in run.outputs:
        run.outputs.append(eval_id)
    build = not run.lineage.evals_of(eval_id)
    return EvalPlan(
        eval_id, build, str(checkpoint_dir), ckpt_id, videoset_id, run.workspace.reports / eval_id
    )


def _branch_of(run: StageRun, checkpoint_dir: str) -> str | None:
    """The newest checkpoint a branch stage (BRANCH_STAGES) trained from the recorded one at checkpoint_dir."""
    rows = run.lineage.query(
        "SELECT checkpoint_id FROM checkpoints WHERE path = ? ORDER BY created_at DESC LIMIT 1",
        [str(Path(checkpoint_dir).resolve())],
    )
    for stage in BRANCH_STAGES if rows else ():
        child = run.lineage.child_checkpoint(rows[0]["checkpoint_id"], stage)
        if child is not None and Path(child["path"]).is_dir():
            return child["path"]
    return None


def plan(
    run: StageRun, checkpoint_dir: str | None, videoset_id: str | None, agent_checkpoint: str | None = None
) -> EvalPlan:
    """Run alone: the newest trained checkpoint and the newest VideoSet. A post-trained checkpoint brings the
    evaluation of the checkpoint it started from (cached like any other) for the paired comparison. An agent_rl
    checkpoint (the pipeline's branch, or the one evaluated) brings its held-out agent comparison into the report;
    run alone, the newest agent_rl branch off the evaluated checkpoint does, as in the pipeline (the same eval key)."""
    alone = checkpoint_dir is None
    checkpoint_dir = checkpoint_dir or run.lineage.latest_checkpoint_path()
    if alone and agent_checkpoint is None:
        agent_checkpoint = _branch_of(run, checkpoint_dir)
    videoset_id = run.input("videoset", videoset_id)
    agent_eval = Path(agent_checkpoint or checkpoint_dir).parent / AGENT_EVAL_FILE
    agent = None
    if agent_checkpoint is not None and agent_eval.is_file():
        sha = hash_checkpoint_dir(agent_checkpoint)
        agent = (run.lineage.checkpoint_id_for(agent_checkpoint, sha), sha)
        run.inputs += [agent[0]] if agent[0] not in run.inputs else []
    main = _one(run, checkpoint_dir, videoset_id, agent)
    main.agent_eval = agent_eval if agent_eval.is_file() else None
    parent = run.lineage.parent_checkpoint(main.checkpoint_id, POST_TRAINING_STAGES)
    if run.config.eval.compare_parent and parent is not None:
        main.baseline = _one(run, parent["path"], videoset_id)
        main.baseline.frames = main.frames
        if (
            main.baseline.eval_id == main.eval_id
        ):  # post-training left the weights as they were: one eval serves
            main.baseline.build = False
        run.outputs.remove(main.eval_id)
        run.outputs.insert(0, main.eval_id)  # the stage's output is the evaluated checkpoint's eval
    return main


def evaluate(run: StageRun, plan: EvalPlan) -> None:
    """Answer every held-out benchmark (and the blank-frame control), write the report, record the evals."""
    s, lineage, out = run.config.eval, run.lineage, plan.out_dir
    members = set(lineage.members(plan.videoset_id))
    videos = [v["path"] for v in lineage.videos("ok") if v["video_id"] in members]
    sets = heldout_benchmarks(videos, out / "benchmarks", split=s.split)
    predict = keye_predict_fn(
        plan.checkpoint_dir, device=s.device, max_new_tokens=s.max_new_tokens, frames_cache=plan.frames
    )
    results = run_benchmarks(predict, sets, out, s.batch_size, s.limit)
    probe = grounding_probe(run, out / "benchmarks" / "probe")
    if probe is not None:
        results.update(run_benchmarks(predict, [probe], out, s.batch_size, s.limit))
    notes, control = {"checkpoint": plan.checkpoint_dir, "videoset": plan.videoset_id}, None
    if plan.baseline is not None:
        comparison = compare_with_baseline(run, plan, results)
        notes[f"vs {plan.baseline.checkpoint_dir}"] = "; ".join(describe(comparison))
    if s.blank_control:
        control_dir = vision_control_path(out).parent
        control = blank_frame_control(predict, sets, results, control_dir, s.batch_size, s.limit)
        notes["blank-frame control"] = describe_control(control)
    agent, agent_eval = None, plan.agent_eval
    if agent_eval is not None:  # an agent_rl checkpoint: its held-out agent tasks go into the same report
        agent = json.loads(agent_eval.read_text(encoding="utf-8"))
        notes["agent tasks"] = (
            f"success {agent['before']['success_rate']:.3f} -> {agent['after']['success_rate']:.3f} "
            f"(sign test p {float(agent['sign_test']['p_value']):.2g}; {agent_eval})"
        )
    write_report(
        dict(results),
        out,
        previous=lineage.previous_eval_metrics(plan.checkpoint_id, list(results)),
        predictions={k: v["_predictions"] for k, v in results.items()},
        notes=notes,
        curves=stage_curves(run.tracker),
        control=control,
        best=best_version(run.tracker, s.registered_model, s.alias),
        agent=agent,
    )
    lineage.record_evals(plan.eval_id, plan.checkpoint_id, results, str(out))


def grounding_probe(run: StageRun, bench_dir: Path) -> BenchSet | None:
    """The timelens_probe benchmark (eval.grounding_probe_videos new held-out videos of the synthetic source), or
    None when the setting is 0. The videos are generated once per workspace and shared by every eval."""
    n = run.config.eval.grounding_probe_videos
    src = run.config.synthetic_source()
    if not n or src is None:
        return None
    videos_dir = materialise_probe(src, n, run.workspace)
    files = write_heldout_benchmarks(
        sorted(videos_dir.glob("*.json")), videos_dir, bench_dir, split="heldout"
    )
    return BenchSet(videos_dir, {"timelens": files["timelens"]}, suffix="_probe")


def _results(run: StageRun, plan: EvalPlan) -> dict[str, dict]:
    return {row["bench"]: json.loads(row["metrics"]) for row in run.lineage.evals_of(plan.eval_id)}


def compare_with_baseline(run: StageRun, plan: EvalPlan, results: dict[str, dict]) -> dict:
    """Question-by-question comparison with the baseline's eval (keye.eval.compare), written beside the report."""
    assert plan.baseline is not None
    same = (
        plan.baseline.eval_id == plan.eval_id
    )  # identical weights: the comparison is with itself (all zero)
    comparison = {
        "checkpoint": plan.checkpoint_dir,
        "baseline": plan.baseline.checkpoint_dir,
        "baseline_eval": plan.baseline.eval_id,
        "identical_weights": same,
        "scores": compare_results(results, results if same else _results(run, plan.baseline)),
    }
    atomic_write_json(plan.out_dir / COMPARISON_FILE, comparison)
    return comparison


def finish(run: StageRun, plan: EvalPlan) -> str:
    """Metrics to MLflow, the checkpoint to the model registry (alias), the headline score in the summary."""
    s, out = run.config.eval, plan.out_dir
    metrics = _results(run, plan)
    for name, m in metrics.items():
        run.tracker.log_metrics(
            flat_metrics({k: v for k, v in m.items() if not k.startswith("_")}, f"{name}/")
        )
    control_path = vision_control_path(out)
    if s.blank_control and control_path.is_file():
        run.tracker.log_metrics(control_metrics(json.loads(control_path.read_text(encoding="utf-8"))))
    comparison_path = out / COMPARISON_FILE
    if plan.baseline is not None and comparison_path.is_file():
        run.tracker.log_metrics(comparison_metrics(json.loads(comparison_path.read_text(encoding="utf-8"))))
    run.tracker.log_artifact(out)
    headline = sum(float(m[m["primary"]]) for m in metrics.values()) / max(len(metrics), 1)
    reg = register_checkpoint(run.tracker, Path(plan.checkpoint_dir), s.registered_model, headline, s.alias)
    run.summary.update(
        eval_score=headline,
        registered_version=reg["version"],
        report=str(out / "report.html"),
        **{f"{k}_{m['primary']}": m[m["primary"]] for k, m in metrics.items()},
    )
    return plan.eval_id
