"""Collect scored groups of rollouts, with DAPO's dynamic sampling: groups whose rewards are all equal carry no
GRPO signal, so they are dropped and more prompts are sampled until `want_groups` groups have signal or
`max_num_gen_batches` generation batches were spent (verl `filter_groups`: enable, max_num_gen_batches; bounded so
a run whose prompts are all too easy or too hard cannot loop forever: it trains on what it found and reports it).
Context-RL (keye.rl.context_rl.recover) runs on each batch before the filter, so recovered groups are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from keye.rl.advantages import overlong_penalty
from keye.rl.rollouts import RolloutEngine, RolloutPrompt, Sample, SamplingSettings


@dataclass
class Collected:
    prompts: list[RolloutPrompt] = field(default_factory=list)
    groups: list[list[Sample]] = field(default_factory=list)
    gen_batches: int = 0
    groups_seen: int = 0
    zero_variance_groups: int = 0
    failed_groups: int = 0  # every sample below the Context-RL success threshold
    recovered_groups: int = 0
    recovered_samples: int = 0
    rollout_tokens: int = 0
    rollout_seconds: float = 0.0
    raw_rewards: list[float] = field(default_factory=list)  # every on-policy sample seen, before filtering


def score(
    groups: list[list[Sample]],
    prompts: list[RolloutPrompt],
    reward_fn: Callable[[str, Mapping[str, Any]], float],
    max_new_tokens: int,
    overlong_buffer_len: int = 0,
    overlong_penalty_factor: float = 1.0,
) -> None:
    """Set each sample's reward: reward_fn(text, reference) plus the overlong penalty when a buffer is set."""
    for g, p in zip(groups, prompts, strict=True):
        for s in g:
            r = float(reward_fn(s.text, p.reference))
            if overlong_buffer_len > 0:
                r += float(
                    overlong_penalty(
                        torch.tensor([len(s.token_ids)]),
                        max_new_tokens,
                        overlong_buffer_len,
                        overlong_penalty_factor,
                    )[0]
                )
            s.reward = r


def _has_signal(group: list[Sample], tol: float = 1e-9) -> bool:
    return len(group) > 1 and max(s.reward for s in group) - min(s.reward for s in group) > tol


def collect_groups(
    engine: RolloutEngine,
    next_prompts: Callable[[], list[RolloutPrompt]],
    reward_fn: Callable[[str, Mapping[str, Any]], float],
    sampling: SamplingSettings,
    want_groups: int,
    *,
    filter_groups: bool = False,
    max_num_gen_batches: int = 3,
    overlong_buffer_len: int = 0,
    overlong_penalty_factor: float = 1.0,
    recover: Callable[[list[RolloutPrompt], list[list[Sample]], SamplingSettings], Any] | None = None,
) -> Collected:
    """Generate, score, (Context-RL), filter; at most `max_num_gen_batches` calls of next_prompts."""
    if max_num_gen_batches < 1:
        raise ValueError("max_num_gen_batches must be >= 1")
    out = Collected()
    while out.gen_batches < (max_num_gen_batches if filter_groups else 1):
        prompts = next_prompts()
        if not prompts:
            break
        batch_sampling = (
            sampling
            if sampling.seed is None
            else replace(sampling, seed=sampling.seed + 100_003 * out.gen_batches)
        )
        t0 = time.perf_counter()
        groups = engine.rollout(prompts, batch_sampling)
        out.rollout_seconds += time.perf_counter() - t0
        out.rollout_tokens += sum(len(s.token_ids) for g in groups for s in g)
        out.gen_batches += 1
        score(
            groups, prompts, reward_fn, sampling.max_new_tokens, overlong_buffer_len, overlong_penalty_factor
        )
        out.raw_rewards += [s.reward for g in groups for s in g]
        out.groups_seen += len(groups)
        out.zero_variance_groups += sum(not _has_signal(g) for g in groups)
        if recover is not None:
            t0 = time.perf_counter()
            stats = recover(prompts, groups, batch_sampling)
            out.rollout_seconds += time.perf_counter() - t0
            out.failed_groups += stats.failed_groups
            out.recovered_groups += stats.recovered_groups
            out.recovered_samples += stats.recovered_samples
            out.rollout_tokens += sum(len(s.token_ids) for g in groups for s in g if s.recovered)
        for p, g in zip(prompts, groups, strict=True):
            if filter_groups and not _has_signal(g):
                continue
            out.prompts.append(p)
            out.groups.append(g)
        if len(out.groups) >= want_groups:
            break
    out.prompts, out.groups = out.prompts[:want_groups], out.groups[:want_groups]
    return out
