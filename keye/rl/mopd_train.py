"""MOPD training: a student checkpoint follows its domains' frozen teachers (keye.rl.mopd) over a prompt set, with
step checkpoints that resume bit for bit and a final/ directory laid out as every trained checkpoint (weights,
tokenizer, frame policy), so `keye eval` and `keye serve` load it unchanged.

Determinism: prompts come in a seeded permutation per epoch whose cursor is saved with the step; rollouts are seeded
per step; the optimizer, scheduler and RNG states are saved, so a run stopped at any step continues exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keye.determinism import seed_everything
from keye.rl.freezing import freeze_vision_and_projector
from keye.rl.mopd import MOPDSettings, mopd_step, reward_by_domain, sampling_teacher
from keye.rl.policy_checkpoints import export_policy, load_policy_step, save_policy_step, seeded_take
from keye.rl.rewards import combined_reward
from keye.rl.rollouts import RolloutPrompt, make_engine
from keye.rl.teachers import CheckpointTeacher, EndpointTeacher, Teacher, TeacherRouter
from keye.train import checkpointing as ckpt
from keye.train.schedules import build_scheduler

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TeacherSpec:
    """Where a domain's teacher comes from: a keye checkpoint directory, or an OpenAI-compatible endpoint that
    returns prompt logprobs (base_url + model); `view` video (frames) or text (the transcript instead)."""

    checkpoint: str | None = None
    base_url: str | None = None
    model: str | None = None
    view: str = "video"

    def build(self, name: str, student_chat: Any, device: str) -> Teacher:
        if (self.checkpoint is None) == (self.base_url is None):
            raise ValueError(f"teacher {name!r}: give exactly one of checkpoint or base_url (+ model)")
        if self.checkpoint is not None:
            return CheckpointTeacher.from_checkpoint(
                self.checkpoint, view=self.view, name=name, device=device
            )
        if not self.model:
            raise ValueError(f"teacher {name!r}: an endpoint teacher needs the served model name")
        return EndpointTeacher(self.base_url, self.model, student_chat, view=self.view, name=name)


@dataclass
class MOPDSchedule:
    steps: int = 100
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    prompts_per_step: int = 32
    save_every: int = 25
    keep_last: int = 2
    seed: int = 0


@dataclass
class MOPDResult:
    checkpoint_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def _stable(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics without wall-clock ones (they differ run to run and would change a hashed file)."""
    return {k: v for k, v in metrics.items() if not k.endswith(("_seconds", "_per_s"))}


def train_mopd(
    student_checkpoint: str | Path,
    teachers: Mapping[str, TeacherSpec | Teacher],
    prompts: Sequence[RolloutPrompt],
    out_dir: str | Path,
    schedule: MOPDSchedule,
    settings: MOPDSettings,
    rewards: Mapping[str, Mapping[str, float] | str],
    *,
    engine: str = "local",
    engine_options: Mapping[str, Any] | None = None,
    device: str = "cpu",
    log_metrics: LogFn | None = None,
) -> MOPDResult:
    """Train into out_dir (step-N/, final/); re-running with the same out_dir resumes from the newest complete
    step checkpoint, and a finished run returns at once. `teachers` and `rewards` are keyed by domain (every prompt's
    reference["domain"] must be in both). No teachers: outcome-only RL (how the specialists are trained)."""
    from keye.serve.chat import ChatModel

    student_checkpoint, out_dir = Path(student_checkpoint), Path(out_dir)
    final = out_dir / "final"
    latest = ckpt.latest_checkpoint(out_dir)
    if (final / "config.json").is_file() and latest is not None and latest[0] >= schedule.steps:
        return MOPDResult(final, latest[0], ckpt.read_trainer_state(latest[1]).get("last_metrics", {}))
    if not prompts:
        raise ValueError("the MOPD prompt set is empty")
    seed_everything(schedule.seed)
    chat = ChatModel.from_checkpoint(student_checkpoint, device=device)
    freeze_vision_and_projector(chat.model)
    router = None
    if teachers:
        router = TeacherRouter(
            {d: t.build(d, chat, device) if isinstance(t, TeacherSpec) else t for d, t in teachers.items()}
        )
        for p in prompts:
            router.domain_of(p)  # every domain has a teacher before any work
    for d in settings.teacher_sampled:  # a teacher that samples must be able to, before any work
        sampling_teacher(router, d, chat)
    missing = sorted({str(p.reference.get("domain")) for p in prompts} - set(rewards))
    if missing:
        raise KeyError(f"no outcome reward for domain(s) {missing}; rewards are set for {sorted(rewards)}")
    reward = reward_by_domain({d: combined_reward(spec) for d, spec in rewards.items()})
    params = [p for p in chat.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    sched = build_scheduler(opt, schedule.steps, schedule.warmup_steps, "constant")
    trainer: dict[str, Any] = {"step": 0, "cursor": 0, "last_metrics": {}}
    if latest is not None:
        trainer = load_policy_step(chat.model, opt, sched, latest[1])
        print(f"[mopd] resuming from {latest[1]} (step {trainer['step']})", flush=True)
    rollout = make_engine(engine, chat, **dict(engine_options or {}))
    step, cursor = int(trainer["step"]), int(trainer["cursor"])
    while step < schedule.steps:
        t0 = time.perf_counter()
        batch = seeded_take(prompts, schedule.seed, cursor, schedule.prompts_per_step)
        cursor += len(batch)
        seed = schedule.seed * 1_000_003 + step * 7919
        m = mopd_step(chat, opt, rollout, lambda b=batch: b, reward, router, settings, seed=seed)
        sched.step()
        step += 1
        m = {**m, "lr": opt.param_groups[0]["lr"], "step_seconds": time.perf_counter() - t0}
        if not all(math.isfinite(v) for v in m.values()):
            raise FloatingPointError(f"[mopd] non-finite metrics at step {step}: {m}")
        if log_metrics is not None:
            log_metrics(m, step)
        trainer = {"step": step, "cursor": cursor, "last_metrics": _stable(m)}
        if step % schedule.save_every == 0 or step == schedule.steps:
            save_policy_step(chat.model, opt, sched, out_dir, step, trainer, schedule.keep_last, "mopd")
    export_policy(chat, student_checkpoint, final)
    return MOPDResult(final, step, trainer["last_metrics"])
