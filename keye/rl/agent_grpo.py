"""One agent GRPO update: multi-turn rollouts (keye.rl.agent_rollouts), group advantages over the episodes' final
rewards, then the same clipped loss as Video-RL (keye.rl.losses.policy_loss) over the response tokens with the
model-token mask, so tool outputs (text and frames) never receive gradient."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from keye.agent.env import AgentTask, ToolEnv
from keye.rl.advantages import group_advantages
from keye.rl.agent_rollouts import AgentSettings, Trajectory, agent_rollout, rollout_metrics
from keye.rl.grpo import GRPOSettings, _micro_share, _pad
from keye.rl.losses import policy_loss
from keye.rl.sequence_policy import response_logprobs


def _score(model: Any, trajs: Sequence[Trajectory], temperature: float, with_entropy: bool = True) -> Any:
    return response_logprobs(
        model,
        [t.prompt for t in trajs],
        [t.response for t in trajs],
        [t.model_mask for t in trajs],
        [t.pixel_patches for t in trajs],
        [t.patch_grids for t in trajs],
        temperature,
        with_entropy,
    )


def train_on_trajectories(
    chat: Any,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[Sequence[Trajectory]],
    settings: GRPOSettings,
    *,
    ref_model: Any = None,
) -> dict[str, float]:
    """Advantages per group, then `ppo_epochs` clipped updates; every loss term is masked to the model's tokens."""
    model = chat.model
    trajs = [t for g in groups for t in g]
    if not trajs:
        return {"trained_samples": 0.0}
    device = model.device
    rewards = torch.tensor([t.reward for t in trajs])
    gid = torch.tensor([gi for gi, g in enumerate(groups) for _ in g])
    adv = group_advantages(rewards, gid, settings.scale_rewards).to(device)
    width = max(1, max(len(t.response) for t in trajs))
    mask = _pad([[float(m) for m in t.model_mask] for t in trajs], width, device)
    if settings.mask_truncated_completions:
        mask = (
            mask
            * torch.tensor([t.finish_reason not in ("length", "tokens") for t in trajs], device=device)[
                :, None
            ]
        )
    order = torch.arange(len(trajs))
    micro = [
        order[a : a + settings.micro_batch_size] for a in range(0, len(trajs), settings.micro_batch_size)
    ]
    old: dict[int, torch.Tensor] = {}
    ref: dict[int, torch.Tensor] = {}
    sums = {"loss": 0.0, "pg_loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "ratio_mean": 0.0}
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for epoch in range(settings.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for j, idx in enumerate(micro):
            part = [trajs[i] for i in idx.tolist()]
            m = mask[idx]
            scores = _score(model, part, settings.temperature)
            pad = width - scores.logprobs.shape[1]
            lp = torch.nn.functional.pad(scores.logprobs, (0, pad))
            ent_rows = torch.nn.functional.pad(scores.entropy, (0, pad))
            if epoch == 0:
                old[j] = lp.detach()
                if ref_model is not None:
                    with torch.no_grad():
                        r = _score(ref_model, part, settings.temperature, with_entropy=False).logprobs
                        ref[j] = torch.nn.functional.pad(r, (0, width - r.shape[1]))
            out = policy_loss(
                lp,
                old[j],
                adv[idx],
                m,
                clip_ratio_low=settings.clip_ratio_low,
                clip_ratio_high=settings.clip_ratio_high,
                clip_ratio_c=settings.clip_ratio_c,
                importance_sampling_level=settings.importance_sampling_level,
                loss_agg_mode=settings.loss_agg_mode,
                max_response_length=width,
                ref_logprobs=ref.get(j),
                kl_coef=settings.kl_coef,
            )
            share = _micro_share(mask, idx, settings.loss_agg_mode)
            (out.loss * share).backward()
            for k in ("loss", "pg_loss", "clip_fraction", "kl", "ratio_mean"):
                sums[k] += float(getattr(out, k).detach()) * share
            sums["entropy"] += float((ent_rows * m).sum() / mask.sum().clamp(min=1))
        params = [p for p in model.parameters() if p.requires_grad]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
        optimizer.step()
    metrics.update({k: v / settings.ppo_epochs for k, v in sums.items()})
    n_model = float(mask.sum())
    metrics["train_tokens_per_s"] = settings.ppo_epochs * n_model / max(time.perf_counter() - t0, 1e-9)
    metrics["trained_samples"] = float(len(trajs))
    return metrics


def agent_grpo_step(
    chat: Any,
    optimizer: torch.optim.Optimizer,
    tasks: Sequence[AgentTask],
    make_env: Callable[[], ToolEnv],
    settings: GRPOSettings,
    agent: AgentSettings,
    *,
    ref_model: Any = None,
    seed: int | None = None,
) -> tuple[dict[str, float], list[list[Trajectory]]]:
    """Roll out `agent.group_size` episodes per task, update once; returns the metrics and the trajectories (for
    the trajectory table)."""
    t0 = time.perf_counter()
    groups = agent_rollout(chat, tasks, make_env, agent, seed=seed)
    rollout_s = time.perf_counter() - t0
    metrics = train_on_trajectories(chat, optimizer, groups, settings, ref_model=ref_model)
    rewards = torch.tensor([t.reward for g in groups for t in g])
    metrics.update(rollout_metrics(groups))
    metrics.update(
        {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "rollout_seconds": rollout_s,
        }
    )
    return metrics, groups
