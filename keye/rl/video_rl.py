"""Video-RL training: GRPO-family updates (keye.rl.grpo) on a checkpoint's policy over a prompt set, with step
checkpoints that resume bit for bit and a final/ directory laid out as every other trained checkpoint (weights,
tokenizer, frame policy), so `keye eval`, `keye serve` and the next stage load it unchanged.

Determinism: the prompt order is a seeded permutation per epoch and the cursor is saved; rollouts are seeded per
step (keye.serve.batching.seeded_generator), so a run killed at any point continues with the same prompts, the
same samples and the same updates as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keye.determinism import seed_everything, without_timings
from keye.rl.freezing import freeze_vision_and_projector
from keye.rl.grpo import GRPOSettings, grpo_step
from keye.rl.policy_checkpoints import export_policy, load_policy_step, save_policy_step, seeded_take
from keye.rl.rewards import combined_reward
from keye.rl.rollouts import RolloutPrompt, make_engine
from keye.train import checkpointing as ckpt
from keye.train.schedules import build_scheduler

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class VideoRLSchedule:
    steps: int = 100
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    prompts_per_step: int = 32  # groups with signal wanted per update (dynamic sampling refills)
    save_every: int = 25
    keep_last: int = 2
    seed: int = 0
    freeze_vision: bool = True  # ViT + projector as SFT left them (keye.rl.freezing)


@dataclass
class VideoRLResult:
    checkpoint_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def task_reward(
    rewards: Mapping[str, Mapping[str, float] | str],
) -> Callable[[str, Mapping[str, Any]], float]:
    """One reward function over a mixed prompt set: the reference's `kind` picks that task's combination of
    registered rewards ({"timelens": {"time_r1": 1.0}, "videomme": "mcq"}); a kind without one is an error."""
    by_kind = {kind: combined_reward(spec) for kind, spec in rewards.items()}

    def reward(completion: str, reference: Mapping[str, Any]) -> float:
        kind = reference.get("kind", "")
        if kind not in by_kind:
            raise KeyError(f"no reward configured for task {kind!r}; rewards are set for {sorted(by_kind)}")
        return by_kind[kind](completion, reference)

    return reward


class PromptCursor:
    """Prompts in a seeded permutation per epoch; `position` (prompts handed out so far) is the whole state."""

    def __init__(self, prompts: Sequence[RolloutPrompt], seed: int, position: int = 0) -> None:
        if not prompts:
            raise ValueError("the RL prompt set is empty")
        self.prompts, self.seed, self.position = list(prompts), seed, position

    def take(self, n: int) -> list[RolloutPrompt]:
        out = seeded_take(self.prompts, self.seed, self.position, n)
        self.position += n
        return out


def train_video_rl(
    init_checkpoint: str | Path,
    prompts: Sequence[RolloutPrompt],
    out_dir: str | Path,
    schedule: VideoRLSchedule,
    grpo: GRPOSettings,
    rewards: Mapping[str, Mapping[str, float] | str],
    *,
    engine: str = "local",
    engine_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    log_metrics: LogFn | None = None,
) -> VideoRLResult:
    """Train into out_dir (step-N/ checkpoints, final/); re-running with the same out_dir resumes from the newest
    complete step checkpoint, and a finished run returns at once."""
    from keye.serve.chat import ChatModel

    init_checkpoint, out_dir = Path(init_checkpoint), Path(out_dir)
    final = out_dir / "final"
    latest = ckpt.latest_checkpoint(out_dir)
    if (final / "config.json").is_file() and latest is not None and latest[0] >= schedule.steps:
        return VideoRLResult(final, latest[0], ckpt.read_trainer_state(latest[1]).get("last_metrics", {}))
    seed_everything(schedule.seed)
    chat = ChatModel.from_checkpoint(init_checkpoint, device=device)
    freeze_vision_and_projector(chat.model, schedule.freeze_vision)
    params = [p for p in chat.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.999), weight_decay=schedule.weight_decay)
    sched = build_scheduler(opt, schedule.steps, schedule.warmup_steps, "constant")
    ref = None
    if grpo.kl_coef > 0:
        ref = ChatModel.from_checkpoint(init_checkpoint, device=device).model.requires_grad_(False)
    trainer: dict[str, Any] = {"step": 0, "cursor": 0, "last_metrics": {}}
    if latest is not None:
        trainer = load_policy_step(chat.model, opt, sched, latest[1])
        print(f"[video_rl] resuming from {latest[1]} (step {trainer['step']})", flush=True)
    cursor = PromptCursor(prompts, schedule.seed, int(trainer["cursor"]))
    rollout = make_engine(engine, chat, **dict(engine_options or {}))
    reward = task_reward(rewards)
    step = int(trainer["step"])
    while step < schedule.steps:
        t0 = time.perf_counter()
        m = grpo_step(
            chat,
            opt,
            rollout,
            lambda: cursor.take(schedule.prompts_per_step),
            reward,
            grpo,
            want_groups=schedule.prompts_per_step,
            ref_model=ref,
            seed=schedule.seed * 1_000_003 + step * 7919,
        )
        sched.step()
        step += 1
        m = {**m, "lr": opt.param_groups[0]["lr"], "step_seconds": time.perf_counter() - t0}
        if not all(math.isfinite(v) for v in m.values()):
            raise FloatingPointError(f"[video_rl] non-finite metrics at step {step}: {m}")
        if log_metrics is not None:
            log_metrics(m, step)
        trainer = {"step": step, "cursor": cursor.position, "last_metrics": without_timings(m)}
        if step % schedule.save_every == 0 or step == schedule.steps:
            save_policy_step(chat.model, opt, sched, out_dir, step, trainer, schedule.keep_last, "video_rl")
    export_policy(chat, init_checkpoint, final)
    return VideoRLResult(final, step, trainer["last_metrics"])
