"""Policy-gradient losses of the GRPO family, with the knob names of verl (`loss_agg_mode`, `clip_ratio_low/high`,
`clip_ratio_c`, rollout importance sampling) and TRL (`importance_sampling_level`, `epsilon`/`epsilon_high`).

Every tensor is [B, L] over the completion tokens (right-padded; `mask` 1 on real tokens), advantages are [B] or
[B, L]. One function computes the clipped surrogate (PPO / GRPO / DAPO clip-higher / dual clip), GSPO's sequence
ratio, the optional k3 KL to a frozen reference and truncated importance weights for a sampler that is not the
trainer; `agg_loss` turns the per-token loss into a scalar as verl's `loss_agg_mode` does.

References: PPO (Schulman et al. 2017), GRPO (DeepSeekMath, arXiv 2402.03300), DAPO (arXiv 2503.14476: clip-higher,
token-mean), Dr.GRPO (arXiv 2503.20783: no length/std normalisation), GSPO (arXiv 2507.18071: sequence ratio
exp(mean_t log rho), clip 3e-4/4e-4), k3 KL estimator (Schulman 2020), truncated importance sampling for
sampler/trainer mismatch (Yao et al. 2025, verl rollout_is: threshold 2.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
IS_LEVELS = ("token", "sequence")
_LOG_RATIO_CLAMP = 20.0  # exp(20) is already far outside any clip range; keeps exp() finite


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def agg_loss(
    loss_mat: Tensor, mask: Tensor, loss_agg_mode: str, max_response_length: int | None = None
) -> Tensor:
    """Scalar loss from per-token losses [B, L] (verl core_algos.agg_loss names).

    token-mean               sum over all tokens / number of tokens (DAPO; long answers weigh more)
    token-sum                sum over all tokens
    seq-mean-token-sum       mean over sequences of each sequence's token sum
    seq-mean-token-mean      mean over sequences of each sequence's token mean (original GRPO)
    seq-mean-token-sum-norm  sum over all tokens / (B * max_response_length) (Dr.GRPO; TRL's dr_grpo constant;
                             max_response_length defaults to L)
    Sequences without any token (empty answers) are left out of the seq-mean modes' means.
    """
    m = mask.to(loss_mat.dtype)
    tok = loss_mat * m
    if loss_agg_mode == "token-mean":
        return tok.sum() / m.sum().clamp(min=1)
    if loss_agg_mode == "token-sum":
        return tok.sum()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        denom = loss_mat.shape[0] * (max_response_length or loss_mat.shape[-1])
        return tok.sum() / max(1, denom)
    n_tok = m.sum(-1)
    has = (n_tok > 0).to(loss_mat.dtype)
    if loss_agg_mode == "seq-mean-token-sum":
        seq = tok.sum(-1)
    elif loss_agg_mode == "seq-mean-token-mean":
        seq = tok.sum(-1) / n_tok.clamp(min=1)
    else:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    return (seq * has).sum() / has.sum().clamp(min=1)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, clamp: float = 10.0) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0 (verl "low_var_kl",
    clamped to [-10, 10] as there)."""
    d = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (d.exp() - d - 1).clamp(-clamp, clamp)


def truncated_importance_weights(
    trainer_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    level: str = "token",
    mode: str = "truncate",
    threshold: float = 2.0,
    threshold_low: float | None = None,
) -> Tensor:
    """Detached weights [B, L] that correct for a sampler mu (vLLM, `keye serve`) that is not the trainer pi_old.

    rho = pi_old / mu per token ("token") or exp(sum_t log rho) per sequence ("sequence", broadcast to its tokens).
    mode "truncate": min(rho, threshold) (TIS, verl rollout_is mode truncate); mode "mask": rho where
    threshold_low <= rho <= threshold, else 0 (ICE-POP / MOPD's w_t; threshold_low defaults to 1/threshold).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"importance sampling level must be one of {IS_LEVELS}, got {level!r}")
    m = mask.to(trainer_logprobs.dtype)
    log_rho = (trainer_logprobs.detach() - sampler_logprobs.detach()) * m
    if level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)
    rho = log_rho.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    if mode == "truncate":
        w = rho.clamp(max=threshold)
    elif mode == "mask":
        low = threshold_low if threshold_low is not None else 1.0 / threshold
        w = torch.where((rho >= low) & (rho <= threshold), rho, torch.zeros_like(rho))
    else:
        raise ValueError(f"importance sampling mode must be 'truncate' or 'mask', got {mode!r}")
    return w * m


@dataclass
class PolicyLoss:
    loss: Tensor  # scalar to backpropagate
    pg_loss: Tensor  # the clipped surrogate part (aggregated)
    kl: Tensor  # mean k3 KL per token (0 without a reference)
    clip_fraction: Tensor  # share of tokens whose clipped term was the active one
    ratio_mean: Tensor  # mean importance ratio per token (1 on-policy)

    def metrics(self) -> dict[str, float]:
        return {
            k: float(getattr(self, k).detach())
            for k in ("loss", "pg_loss", "kl", "clip_fraction", "ratio_mean")
        }


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = None,
    importance_sampling_level: str = "token",
    loss_agg_mode: str = "token-mean",
    max_response_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    rollout_is_weights: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> PolicyLoss:
    """The clipped policy-gradient loss: per token max(-A rho, -A clip(rho, 1 - low, 1 + high)) (+ dual clip:
    for A < 0 at most -A c), times the rollout importance weight, plus kl_coef * k3 KL; then `agg_loss`.

    importance_sampling_level "token": rho_t = pi/pi_old per token (GRPO/DAPO); "sequence": GSPO's
    s = exp(mean_t log rho_t) per sequence, used per token as sg[s] * pi_t / sg[pi_t] so that the gradient is GSPO's
    (use clip_ratio_low/high 3e-4/4e-4 then). `token_weights` [B, L] (or [B]) scales each token's surrogate before
    aggregation (Context-RL weights recovered samples with it). Defaults: DAPO clip-higher 0.2 / 0.28, token-mean.
    """
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}"
        )
    m = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logprobs)
    log_ratio = (logprobs - old_logprobs.detach()) * m
    if importance_sampling_level == "sequence":
        seq = log_ratio.sum(-1) / m.sum(-1).clamp(min=1)
        log_ratio = logprobs - logprobs.detach() + seq.detach()[:, None]
    ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pg = torch.maximum(loss1, loss2)
    clipped = (loss2 > loss1).to(logprobs.dtype)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {clip_ratio_c}")
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_ratio_c), pg)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights.detach()
    if token_weights is not None:
        tw = token_weights.to(pg.dtype)
        pg = pg * (tw[:, None] if tw.dim() == 1 else tw)
    pg_loss = agg_loss(pg, m, loss_agg_mode, max_response_length)
    loss = pg_loss
    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None and kl_coef:
        kl_mat = kl_k3(logprobs, ref_logprobs)
        loss = loss + kl_coef * agg_loss(kl_mat, m, loss_agg_mode, max_response_length)
        kl = masked_mean(kl_mat.detach(), m)
    elif ref_logprobs is not None:
        kl = masked_mean(kl_k3(logprobs.detach(), ref_logprobs), m)
    return PolicyLoss(
        loss=loss,
        pg_loss=pg_loss.detach(),
        kl=kl,
        clip_fraction=masked_mean(clipped, m).detach(),
        ratio_mean=masked_mean(ratio.detach(), m),
    )


def completion_mask(
    lengths: Tensor | list[int],
    max_len: int | None = None,
    truncated: Tensor | list[bool] | None = None,
    mask_truncated_completions: bool = False,
) -> Tensor:
    """[B, L] float mask of the completion tokens of right-padded rows. With mask_truncated_completions (TRL), rows
    cut by the length limit get no tokens at all: they neither gain nor lose for an answer they could not finish."""
    lens = torch.as_tensor(lengths, dtype=torch.int64)
    width = int(max_len if max_len is not None else (int(lens.max()) if lens.numel() else 0))
    mask = (torch.arange(width)[None, :] < lens[:, None]).to(torch.float32)
    if mask_truncated_completions and truncated is not None:
        mask = mask * (~torch.as_tensor(truncated, dtype=torch.bool))[:, None].to(mask.dtype)
    return mask
