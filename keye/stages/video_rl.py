"""The video_rl stage: GRPO-family RL with a temporal reward (and Context-RL) on the SFT checkpoint, over the
training split's questions, asked exactly as the evaluation asks them; one RL checkpoint out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.core.hashing import hash_checkpoint_dir, settings_hash
from keye.rl.prompt_sets import split_prompts
from keye.rl.video_rl import VideoRLSchedule, train_video_rl
from keye.stages.artifact import StageRun
from keye.stages.video_rl_settings import grpo_settings


@dataclass
class VideoRLPlan:
    checkpoint_id: str
    build: bool  # False: a previous run completed this output
    init: str  # the checkpoint it starts from (the SFT checkpoint in the pipeline)
    init_id: str
    videoset_id: str
    out_dir: Path


def plan(run: StageRun, checkpoint_dir: str | None, videoset_id: str | None) -> VideoRLPlan:
    """Run alone: the newest trained checkpoint and the newest VideoSet."""
    s = run.config.video_rl
    init = checkpoint_dir or run.lineage.latest_checkpoint_path()
    sha = hash_checkpoint_dir(init)
    init_id = run.lineage.checkpoint_id_for(init, sha)
    videoset_id = run.input("videoset", videoset_id)
    ck_id = run.key("rl", sha, videoset_id, settings_hash(s), run.config.seed)
    out_dir = run.workspace.checkpoints / ck_id
    build = run.produce(ck_id, "training", "video_rl", s, [init_id, videoset_id], path=str(out_dir))
    return VideoRLPlan(ck_id, build, str(init), init_id, videoset_id, out_dir)


def _device(run: StageRun) -> str:
    import torch

    d = run.config.video_rl.device or run.config.train.device
    return d or ("cuda" if torch.cuda.is_available() else "cpu")


def train(run: StageRun, plan: VideoRLPlan) -> None:
    """RL from the init checkpoint (resuming from its step checkpoints), recorded with edges from the init
    checkpoint and the VideoSet whose training split gave the prompts."""
    s, lineage = run.config.video_rl, run.lineage
    members = set(lineage.members(plan.videoset_id))
    videos = [v["path"] for v in lineage.videos("ok") if v["video_id"] in members]
    prompts = split_prompts(
        videos, plan.out_dir / "prompts", "train", kinds=s.tasks, grounding_windows=s.grounding_windows
    )
    options: dict[str, Any] = {}
    if s.engine == "openai":
        options = {"base_url": s.base_url, "model": s.served_model}
    schedule = VideoRLSchedule(
        steps=s.steps,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        prompts_per_step=s.prompts_per_step,
        save_every=s.save_every,
        seed=run.config.seed,
        freeze_vision=s.freeze_vision,
    )
    result = train_video_rl(
        plan.init,
        prompts,
        plan.out_dir,
        schedule,
        grpo_settings(s),
        s.rewards,
        engine=s.engine,
        engine_options=options,
        device=_device(run),
        log_metrics=run.tracker.log_metrics,
    )
    sha = hash_checkpoint_dir(result.checkpoint_dir)
    cid = plan.checkpoint_id
    meta = {"steps": result.steps, "prompts": len(prompts), **result.metrics}
    lineage.record_checkpoint(
        cid, str(result.checkpoint_dir.resolve()), sha, "video_rl", result.steps, run.run_id, run.inputs, meta
    )
    lineage.complete_artifact(cid, sha256=sha, meta=meta)


def finish(run: StageRun, plan: VideoRLPlan) -> str:
    """The RL checkpoint's final/ directory (what eval reads); its last step's metrics go to the summary."""
    run.numbers(run.meta(plan.checkpoint_id))
    return str(plan.out_dir / "final")
