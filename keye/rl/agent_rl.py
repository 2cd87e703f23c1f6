"""Agent-RL training: agent GRPO updates (keye.rl.agent_grpo) of a checkpoint's policy over agent tasks with the
`frames`, `search` and `python` tools, step checkpoints that resume bit for bit, the trajectories of every step as
Parquet (what the stage logs to MLflow), and a final/ directory laid out as every trained checkpoint (weights,
tokenizer, frame policy) so `keye eval` / `keye serve` / the next stage load it unchanged.

Determinism: tasks come in a seeded permutation per epoch with the cursor saved, and each step's rollouts are
seeded by the step, so a run stopped at any step checkpoint continues exactly as one that never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keye.agent.demos import demonstration
from keye.agent.env import AgentTask, EnvLimits, ToolEnv
from keye.agent.sandbox import SandboxLimits
from keye.agent.search import Document, SearchIndex
from keye.agent.tools import FramesTool, PythonTool, SearchTool
from keye.determinism import seed_everything, without_timings
from keye.model.shared_prefix import dense_only, share_prefix, sharing_prefix
from keye.rl.agent_grpo import agent_grpo_step
from keye.rl.agent_rollouts import AgentSettings, trajectory_rows, write_trajectories
from keye.rl.freezing import freeze_vision_and_projector
from keye.rl.grpo import GRPOSettings
from keye.rl.policy_checkpoints import export_policy, load_policy_step, save_policy_step, seeded_take
from keye.rl.rewards import get_reward
from keye.train import checkpointing as ckpt
from keye.train.schedules import lr_multiplier

LogFn = Callable[[dict[str, float], int], None]
TOOLS = ("frames", "search", "python")


@dataclass
class AgentRLSchedule:
    steps: int = 100
    lr: float = 1e-6
    tasks_per_step: int = 8
    save_every: int = 25
    keep_last: int = 2
    seed: int = 0
    warmup_steps: int = 0  # supervised steps on tool-use demonstrations before RL (0: none)
    warmup_lr: float = 1e-4
    warmup_batch_size: int = 4  # demonstrations per warm-up step
    # share of the training videos whose tasks only RL sees, never the warm-up (0: one shared set)
    rl_only_fraction: float = 0.0


@dataclass
class AgentToolSettings:
    tools: tuple[str, ...] = TOOLS
    max_turns: int = 4
    max_calls_per_turn: int = 2
    frames_max: int = 10  # frames one `frames` call may return: 10 pin a moment to 0.25 s in a 2.5 s gap
    python: SandboxLimits = field(default_factory=SandboxLimits)
    reward: str = "agent_task"


@dataclass
class AgentRLResult:
    checkpoint_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    trajectories: list[Path] = field(default_factory=list)


def env_factory(chat: Any, docs: Sequence[Document], settings: AgentToolSettings) -> Callable[[], ToolEnv]:
    """A fresh environment per episode (the python tool's scratch directory is per episode)."""
    index = SearchIndex(list(docs))
    reward = get_reward(settings.reward)
    limits = EnvLimits(settings.max_turns, settings.max_calls_per_turn)
    unknown = sorted(set(settings.tools) - set(TOOLS))
    if unknown:
        raise ValueError(f"unknown agent tool(s) {unknown}; choose from {list(TOOLS)}")

    def make() -> ToolEnv:
        tools: list[Any] = []
        if "frames" in settings.tools:
            tools.append(FramesTool(chat.policy, max_frames=settings.frames_max))
        if "search" in settings.tools:
            tools.append(SearchTool(index))
        if "python" in settings.tools:
            tools.append(PythonTool(settings.python))
        return ToolEnv(tools, reward, limits)

    return make


def demonstrations(tasks: Sequence[AgentTask], make_env: Callable[[], ToolEnv]) -> list[dict[str, Any]]:
    """The teacher's solved conversations for the tasks it has a script for (unsolved ones dropped)."""
    demos = (demonstration(t, make_env) for t in tasks)
    return [d for d in demos if d is not None and d["reward"] == 1.0]


def split_for_warmup(
    tasks: Sequence[AgentTask], rl_only_fraction: float, seed: int
) -> tuple[list[AgentTask], list[AgentTask]]:
    """(warm-up tasks, RL tasks): a seeded share of the training videos keeps its tasks for RL only.

    Why: the warm-up fits its demonstrations nearly exactly (loss ~0.003), so GRPO on the same tasks samples the
    memorised answer in every episode (training reward 0.9 beside 0.3 held-out, measured) and has no group that
    differs to learn from; on tasks of unseen videos it meets the held-out error rate. Split by video, so no
    video's answers leak from the demonstrations into RL's prompts. 0 keeps one shared set."""
    if not 0.0 <= rl_only_fraction < 1.0:
        raise ValueError(f"rl_only_fraction must be in [0, 1), got {rl_only_fraction}")
    if rl_only_fraction == 0.0:
        return list(tasks), list(tasks)
    videos = sorted({t.video_id or t.id for t in tasks})
    order = np.random.default_rng([seed, 1919]).permutation(len(videos))
    n_rl = min(len(videos) - 1, max(1, round(rl_only_fraction * len(videos))))
    rl_videos = {videos[int(i)] for i in order[:n_rl]}
    rl = [t for t in tasks if (t.video_id or t.id) in rl_videos]
    return [t for t in tasks if (t.video_id or t.id) not in rl_videos], rl


def demo_warmup(
    chat: Any,
    demos: Sequence[dict[str, Any]],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 4,
    no_shared_prefix: bool = False,
) -> dict[str, float]:
    """Supervised steps on tool-use demonstrations (keye.agent.demos): cross-entropy on the assistant tokens only
    (calls and answers; tool turns and prompts masked), so the policy writes calls RL can then reward."""
    from keye.rl.policy import _positions

    model = chat.model
    examples = [chat.encode(d["messages"], tools=d["tools"], add_generation_prompt=False) for d in demos]
    if not examples or steps <= 0:
        return {}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 19])
    model.train()
    losses = []
    ramp = max(1, steps // 20)
    dense = dense_only(model) and not no_shared_prefix
    rows = [0, 0]  # rows computed, rows of the demonstrations as written
    t0 = time.perf_counter()
    for step in range(steps):  # linear ramp over 5%, then cosine to 10% of lr: the last steps settle the copy
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier(step, steps, ramp, "cosine")
        pick = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        ids, pos, labels, patches, grids, lens = [], [], [], [], [], []
        for i in pick:
            prompt, mask = examples[int(i)]
            ids.append(prompt.input_ids)
            pos.append(_positions(model, prompt.input_ids, prompt.patch_grids))
            labels.append(torch.where(mask, prompt.input_ids, torch.full_like(prompt.input_ids, -100)))
            lens.append(len(prompt.input_ids))
            if prompt.pixel_patches is not None:
                patches.append(prompt.pixel_patches)
                grids.append(prompt.patch_grids)
        pixels = {
            "pixel_patches": torch.cat(patches).to(model.device, model.dtype) if patches else None,
            "patch_grids": torch.cat(grids).to(model.device) if grids else None,
        }
        # the demonstrations open with the same system prompt and tool block: computed once per step when exact
        shared = share_prefix(ids, pos, labels, model.config.image_token_id) if dense else None
        if shared is not None:
            inputs = (shared.input_ids, shared.position_ids, shared.layout.cu_seqlens, shared.labels)
            packing = sharing_prefix(model, shared.layout)
        else:
            cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
            inputs = (torch.cat(ids), torch.cat(pos, dim=1), cu, torch.cat(labels))
            packing = contextlib.nullcontext()
        rows[0] += len(inputs[0])
        input_ids, position_ids, cu_seqlens, targets = (x.to(model.device) for x in inputs)
        with packing:  # the backward too: recomputed layers must see the same layout
            out = model(
                input_ids=input_ids,
                position_ids=position_ids,
                cu_seqlens=cu_seqlens,
                labels=targets,
                **pixels,
            )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        rows[1] += sum(lens)
        opt.step()
        losses.append(float(out.loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0 or step == 9:  # the measured recipe is minutes on a GPU and
            # ~20 min on a 2-core CPU: say where it stands and when it ends
            spent = time.perf_counter() - t0
            print(
                f"[agent_rl] warm-up step {step + 1}/{steps}: loss {losses[-1]:.4f}, {spent:.0f} s, "
                f"~{spent / (step + 1) * (steps - step - 1):.0f} s to go",
                flush=True,
            )
    return {
        "warmup_loss_first": losses[0],
        "warmup_loss_last": losses[-1],
        "warmup_demos": float(len(examples)),
        "warmup_rows_share": rows[0] / max(1, rows[1]),  # < 1: the shared prefix's saving
        "warmup_seconds": time.perf_counter() - t0,
    }


def train_agent_rl(
    init_checkpoint: str | Path,
    tasks: Sequence[AgentTask],
    docs: Sequence[Document],
    out_dir: str | Path,
    schedule: AgentRLSchedule,
    grpo: GRPOSettings,
    agent: AgentSettings,
    tools: AgentToolSettings | None = None,
    *,
    device: str = "cpu",
    log_metrics: LogFn | None = None,
) -> AgentRLResult:
    """Train into out_dir (step-N/ checkpoints, trajectories/step-N.parquet, final/); re-running with the same
    out_dir resumes from the newest complete step checkpoint, and a finished run returns at once."""
    from keye.serve.chat import ChatModel

    if not tasks:
        raise ValueError("the agent task set is empty (derive it with keye.agent.tasks.derive_tasks)")
    init_checkpoint, out_dir = Path(init_checkpoint), Path(out_dir)
    final, traj_dir = out_dir / "final", out_dir / "trajectories"
    latest = ckpt.latest_checkpoint(out_dir)
    if (final / "config.json").is_file() and latest is not None and latest[0] >= schedule.steps:
        done = ckpt.read_trainer_state(latest[1])
        return AgentRLResult(
            final, latest[0], done.get("last_metrics", {}), sorted(traj_dir.glob("*.parquet"))
        )
    seed_everything(schedule.seed)
    chat = ChatModel.from_checkpoint(init_checkpoint, device=device)
    freeze_vision_and_projector(chat.model)
    opt = torch.optim.AdamW(
        [p for p in chat.model.parameters() if p.requires_grad], lr=schedule.lr, weight_decay=0.0
    )
    ref = None
    if grpo.kl_coef > 0:
        ref = ChatModel.from_checkpoint(init_checkpoint, device=device).model.requires_grad_(False)
    trainer: dict[str, Any] = {"step": 0, "cursor": 0, "last_metrics": {}}
    if latest is not None:
        trainer = load_policy_step(chat.model, opt, None, latest[1])
        print(f"[agent_rl] resuming from {latest[1]} (step {trainer['step']})", flush=True)
    make_env = env_factory(chat, docs, tools or AgentToolSettings())
    warm_tasks, rl_tasks = (
        split_for_warmup(tasks, schedule.rl_only_fraction, schedule.seed)
        if schedule.warmup_steps > 0
        else (list(tasks), list(tasks))
    )
    if latest is None and schedule.warmup_steps > 0:
        warm = demo_warmup(
            chat,
            demonstrations(warm_tasks, make_env),
            schedule.warmup_steps,
            schedule.warmup_lr,
            schedule.seed,
            batch_size=schedule.warmup_batch_size,
        )
        print(f"[agent_rl] demonstration warm-up: {warm}", flush=True)
        export_policy(
            chat, init_checkpoint, out_dir / "warmup"
        )  # the warm-up alone: RL's own gain is measured
    step, cursor = int(trainer["step"]), int(trainer["cursor"])
    while step < schedule.steps:
        t0 = time.perf_counter()
        batch = seeded_take(rl_tasks, schedule.seed, cursor, schedule.tasks_per_step)
        cursor += len(batch)
        m, groups = agent_grpo_step(
            chat,
            opt,
            batch,
            make_env,
            grpo,
            agent,
            ref_model=ref,
            seed=schedule.seed * 1_000_003 + step * 7919,
        )
        step += 1
        write_trajectories(traj_dir / f"step-{step:06d}.parquet", trajectory_rows(groups, step))
        m = {**m, "lr": opt.param_groups[0]["lr"], "step_seconds": time.perf_counter() - t0}
        if not all(math.isfinite(v) for v in m.values()):
            raise FloatingPointError(f"[agent_rl] non-finite metrics at step {step}: {m}")
        if log_metrics is not None:
            log_metrics(m, step)
        stable = {k: v for k, v in without_timings(m).items() if not k.endswith(("_seconds", "_per_s"))}
        trainer = {"step": step, "cursor": cursor, "last_metrics": stable}
        if step % schedule.save_every == 0 or step == schedule.steps:
            save_policy_step(chat.model, opt, None, out_dir, step, trainer, schedule.keep_last, "agent_rl")
    export_policy(chat, init_checkpoint, final)
    return AgentRLResult(final, step, trainer["last_metrics"], sorted(traj_dir.glob("*.parquet")))
