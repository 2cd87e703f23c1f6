"""Group-relative advantages (GRPO), the DAPO overlong penalty and the zero-variance group test behind dynamic
sampling. Plain tensors in and out; knob names follow TRL (`scale_rewards`) and verl (`overlong_buffer`).

Samples are flat ([N]) with a group index per sample, so groups may differ in size (Context-RL adds recovered
samples to a group; dynamic sampling drops whole groups).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")


def _group_stats(rewards: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group mean, group unbiased std, group size); std is 0 for groups of one."""
    groups = groups.to(torch.int64)
    n = int(groups.max()) + 1 if groups.numel() else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, groups, torch.ones_like(r))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, groups, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(n, dtype=torch.float64).index_add_(0, groups, (r - mean[groups]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return mean[groups], std[groups], count[groups]


def group_advantages(
    rewards: Tensor, groups: Tensor, scale_rewards: str = "group", eps: float = 1e-6
) -> Tensor:
    """A_i = (r_i - mean_group) / (std + eps), one value per sample (broadcast over its tokens by the loss).

    scale_rewards: "group" divides by the group's std (GRPO), "batch" by the std of all rewards in the batch (TRL's
    "batch", robust when a group's std is tiny), "none" does not divide (Dr.GRPO: no difficulty bias). std is the
    unbiased one (torch.std), as verl and TRL compute it. A group of one sample has no baseline: advantage 0.
    A group whose rewards are all equal gets advantage 0 whatever the scaling (dynamic sampling drops them).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.shape != groups.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must be equal 1-D")
    if rewards.numel() == 0:
        return rewards.to(torch.float32)
    mean, std, count = _group_stats(rewards, groups)
    centred = torch.where(count > 1, rewards.to(torch.float64) - mean, torch.zeros_like(mean))
    if scale_rewards == "group":
        adv = centred / (std + eps)
    elif scale_rewards == "batch":
        batch_std = (
            rewards.to(torch.float64).std() if rewards.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        )
        adv = centred / (batch_std + eps)
    else:
        adv = centred
    return adv.to(torch.float32)


def zero_variance_groups(rewards: Tensor, groups: Tensor, tol: float = 1e-9) -> Tensor:
    """Bool per sample: its group's rewards are all equal (no learning signal; DAPO's dynamic sampling drops it).
    A group of one sample counts as zero-variance."""
    _, std, _ = _group_stats(rewards, groups)
    return std <= tol


def overlong_penalty(
    lengths: Tensor, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO soft overlong punishment (verl `overlong_buffer`: len, penalty_factor), added to the reward:
    0 up to max - buffer tokens, then falling linearly to -penalty_factor at max tokens (and below beyond it)."""
    if buffer_length <= 0:
        raise ValueError("overlong buffer_length must be > 0")
    if buffer_length > max_response_length:
        raise ValueError(f"overlong buffer {buffer_length} exceeds max_response_length {max_response_length}")
    expected = max_response_length - buffer_length
    exceed = lengths.to(torch.float32) - expected
    return torch.clamp(-exceed / buffer_length * penalty_factor, max=0.0)
