"""One GRPO-family update, from prompts to an optimizer step: rollouts (any engine), rewards, Context-RL,
dynamic sampling, group advantages, then `ppo_epochs` passes of the clipped loss over micro-batches.

Everything is a plain value: a model (wrapped in keye.serve.chat.ChatModel for its tokenizer and frame sampler),
an optimizer, a rollout engine, a prompt source and a reward function in; a dict of metrics out (reward mean/std,
zero-variance share, recovered share, response length, clip fraction, entropy, KL, tokens/s of rollouts and of
training). The pipeline stage adds checkpoints, tracking and lineage around it.
Defaults follow DAPO (clip 0.2/0.28, token-mean, no KL); GRPO / Dr.GRPO / GSPO are settings (docs/TRAINING.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from keye.rl.advantages import group_advantages
from keye.rl.context_rl import ContextRLSettings, recover
from keye.rl.dynamic_sampling import Collected, collect_groups
from keye.rl.losses import policy_loss, truncated_importance_weights
from keye.rl.policy import answer_logprobs
from keye.rl.rollouts import RolloutEngine, RolloutPrompt, Sample, SamplingSettings


@dataclass
class GRPOSettings:
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    scale_rewards: str = "group"  # group | batch | none (Dr.GRPO)
    loss_agg_mode: str = "token-mean"  # see keye.rl.losses.agg_loss
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28  # DAPO clip-higher
    clip_ratio_c: float | None = None  # dual clip (verl: 3.0)
    importance_sampling_level: str = "token"  # token | sequence (GSPO; use clip 3e-4 / 4e-4)
    kl_coef: float = 0.0  # k3 KL to the frozen reference (needs ref_model)
    overlong_buffer_len: int = 0  # DAPO soft overlong punishment; 0 = off
    overlong_penalty_factor: float = 1.0
    mask_truncated_completions: bool = False
    filter_groups: bool = False  # dynamic sampling
    max_num_gen_batches: int = 3
    rollout_is: str = "truncate"  # truncate | mask | none: correction when the sampler is not the trainer
    rollout_is_level: str = "token"
    rollout_is_threshold: float = 2.0
    ppo_epochs: int = 1
    micro_batch_size: int = 64  # samples per forward/backward
    max_grad_norm: float = 1.0
    context_rl: ContextRLSettings | None = None

    def sampling(self, seed: int | None) -> SamplingSettings:
        return SamplingSettings(
            n=self.group_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            seed=seed,
        )


def _pad(rows: list[list[float]], width: int, device: Any) -> torch.Tensor:
    out = torch.zeros(len(rows), width, device=device)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r[:width], device=device)
    return out


def _micro_share(mask: torch.Tensor, idx: torch.Tensor, mode: str) -> float:
    """The share of the batch's normaliser that one micro-batch holds, so that summing micro-batch losses equals the
    loss of the whole batch in every aggregation mode."""
    if mode == "token-mean":
        return float(mask[idx].sum() / mask.sum().clamp(min=1))
    if mode == "token-sum":
        return 1.0
    if mode == "seq-mean-token-sum-norm":
        return len(idx) / mask.shape[0]
    has = (mask.sum(-1) > 0).float()
    return float(has[idx].sum() / has.sum().clamp(min=1))


def train_on_groups(
    chat: Any,
    optimizer: torch.optim.Optimizer,
    collected: Collected,
    settings: GRPOSettings,
    *,
    sampler_is_trainer: bool = True,
    ref_model: Any = None,
) -> dict[str, float]:
    """Advantages over each group (recovered samples included), then the clipped update."""
    model = chat.model
    samples: list[Sample] = [s for g in collected.groups for s in g]
    metrics: dict[str, float] = {}
    if not samples:
        return {"trained_samples": 0.0}
    if any(s.prompt is None for s in samples):
        raise ValueError(
            "samples lack the original prompt's model input: give the rollout engine the ChatModel of the trained "
            "model (OpenAIEngine(..., chat=...)) so the trainer can score the sampled tokens"
        )
    rewards = torch.tensor([s.reward for s in samples])
    gid = torch.tensor([gi for gi, g in enumerate(collected.groups) for _ in g])
    adv = group_advantages(rewards, gid, settings.scale_rewards)
    lens = [len(s.token_ids) for s in samples]
    width = max(1, max(lens))
    device = model.device
    mask = torch.zeros(len(samples), width, device=device)
    for i, n in enumerate(lens):
        if not (settings.mask_truncated_completions and samples[i].truncated):
            mask[i, :n] = 1.0
    weights = torch.tensor([s.weight for s in samples], device=device)
    sampler_lp = _pad([s.logprobs for s in samples], width, device)
    order = torch.arange(len(samples))
    micro = [
        order[a : a + settings.micro_batch_size] for a in range(0, len(samples), settings.micro_batch_size)
    ]
    old: dict[int, torch.Tensor] = {}
    ref: dict[int, torch.Tensor] = {}
    sums = {"loss": 0.0, "pg_loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "ratio_mean": 0.0}
    steps = 0
    t0 = time.perf_counter()
    model.train()
    for epoch in range(settings.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        for j, idx in enumerate(micro):
            il = idx.tolist()
            m = mask[idx]
            scores = answer_logprobs(
                model,
                [samples[i].prompt for i in il],
                [samples[i].token_ids for i in il],
                settings.temperature,
            )
            pad = width - scores.logprobs.shape[1]  # micro-batches are padded to the batch's longest answer
            lp = torch.nn.functional.pad(scores.logprobs, (0, pad))
            ent_rows = torch.nn.functional.pad(scores.entropy, (0, pad))
            if epoch == 0:
                old[j] = lp.detach()
                if ref_model is not None:
                    with torch.no_grad():
                        ref[j] = answer_logprobs(
                            ref_model,
                            [samples[i].prompt for i in il],
                            [samples[i].token_ids for i in il],
                            settings.temperature,
                            with_entropy=False,
                        ).logprobs
                        ref[j] = torch.nn.functional.pad(ref[j], (0, width - ref[j].shape[1]))
            is_w = None
            if not sampler_is_trainer and settings.rollout_is != "none":
                is_w = truncated_importance_weights(
                    old[j],
                    sampler_lp[idx],
                    m,
                    settings.rollout_is_level,
                    settings.rollout_is,
                    settings.rollout_is_threshold,
                )
                recovered = torch.tensor([samples[i].recovered for i in il], device=device)
                is_w = torch.where(recovered[:, None], m, is_w)  # no sampler correction for recovered samples
            out = policy_loss(
                lp,
                old[j],
                adv[idx].to(device),
                m,
                clip_ratio_low=settings.clip_ratio_low,
                clip_ratio_high=settings.clip_ratio_high,
                clip_ratio_c=settings.clip_ratio_c,
                importance_sampling_level=settings.importance_sampling_level,
                loss_agg_mode=settings.loss_agg_mode,
                max_response_length=settings.max_new_tokens,
                ref_logprobs=ref.get(j),
                kl_coef=settings.kl_coef,
                rollout_is_weights=is_w,
                token_weights=weights[idx],
            )
            share = _micro_share(mask, idx, settings.loss_agg_mode)
            (out.loss * share).backward()
            for k in ("loss", "pg_loss", "clip_fraction", "kl", "ratio_mean"):
                sums[k] += float(getattr(out, k).detach()) * share
            ent = (ent_rows * m).sum() / m.sum().clamp(min=1)
            sums["entropy"] += float(ent) * float(m.sum() / mask.sum().clamp(min=1))
        params = [p for p in model.parameters() if p.requires_grad]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
        optimizer.step()
        steps += 1
    train_s = time.perf_counter() - t0
    metrics.update({k: v / steps for k, v in sums.items()})
    metrics["train_tokens_per_s"] = settings.ppo_epochs * sum(lens) / max(train_s, 1e-9)
    metrics["trained_samples"] = float(len(samples))
    return metrics


def grpo_step(
    chat: Any,
    optimizer: torch.optim.Optimizer,
    engine: RolloutEngine,
    next_prompts: Callable[[], list[RolloutPrompt]],
    reward_fn: Callable[[str, Mapping[str, Any]], float],
    settings: GRPOSettings,
    *,
    want_groups: int,
    ref_model: Any = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Collect `want_groups` groups (dynamic sampling and Context-RL as set), then update; returns metrics."""
    sampling = settings.sampling(seed)
    rec = None
    if settings.context_rl is not None:
        cfg = settings.context_rl
        rec = lambda prompts, groups, s: recover(engine, prompts, groups, reward_fn, cfg, s)  # noqa: E731
    collected = collect_groups(
        engine,
        next_prompts,
        reward_fn,
        sampling,
        want_groups,
        filter_groups=settings.filter_groups,
        max_num_gen_batches=settings.max_num_gen_batches,
        overlong_buffer_len=settings.overlong_buffer_len,
        overlong_penalty_factor=settings.overlong_penalty_factor,
        recover=rec,
    )
    metrics = train_on_groups(
        chat,
        optimizer,
        collected,
        settings,
        sampler_is_trainer=engine.sampler_is_trainer,
        ref_model=ref_model,
    )
    raw = torch.tensor(collected.raw_rewards) if collected.raw_rewards else torch.zeros(1)
    on_policy = [s for g in collected.groups for s in g if not s.recovered]
    metrics.update(
        {
            "reward_mean": float(raw.mean()),
            "reward_std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "zero_variance_share": collected.zero_variance_groups / max(1, collected.groups_seen),
            "recovered_share": collected.recovered_groups / max(1, collected.failed_groups) if rec else 0.0,
            "recovered_samples": float(collected.recovered_samples),
            "response_length": sum(len(s.token_ids) for s in on_policy) / max(1, len(on_policy)),
            "truncated_share": sum(s.truncated for s in on_policy) / max(1, len(on_policy)),
            "rollout_tokens_per_s": collected.rollout_tokens / max(collected.rollout_seconds, 1e-9),
            "gen_batches": float(collected.gen_batches),
            "groups": float(len(collected.groups)),
        }
    )
    return metrics
