"""Multi-teacher On-Policy Distillation (MOPD, MiMo-V2-Flash arXiv 2601.02780 eq. 5-9; Keye-VL-2.0's answer to
forgetting across alignment domains): the student samples its own answers, each answer is re-scored token by token
by the ONE teacher of its prompt's domain (keye.rl.teachers), and the student follows

  L   = - E[ (1/|y|) sum_t w_t * A_t * log pi_theta(y_t) ]                         (REINFORCE, loss_agg_mode)
  A_t = sg[ log pi_teacher(y_t) - log pi_theta(y_t) ] + alpha * A_outcome           (NeMo-RL's OPD advantage)
  w_t = sg[ pi_theta / mu ] if eps_low <= pi_theta / mu <= eps_high else 0         (gated train/infer ratio)

A_outcome is the group-normalised outcome reward (keye.rl.advantages), mu the sampler's log-probs. Tokens outside the
gate, padding, tokens the teacher could not score (distillation part) and any `token_mask` (frames, tool outputs)
carry no loss. `full_vocab_kl` replaces the sampled distillation term by the exact reverse KL
sum_v pi_theta(v) (log pi_theta(v) - log pi_teacher(v)) at every answer position (teachers sharing the tokenizer;
no sampling noise). Teachers are frozen: only their numbers enter, detached.

`teacher_sampled` (domain -> share) has that share of a domain's groups sampled by its own teacher (on the teacher's
view of the prompt) instead of the student, and trains the student on them by log-likelihood, the forward KL to the
teacher on its own samples: GKD's mix of on- and off-policy data (Agarwal et al., arXiv 2306.13649, student share
lambda = 1 - share). On-policy distillation corrects only what the student samples; a student that never writes a
caption samples nothing caption-like for the caption teacher to correct (bench/RESULTS.md `## mopd_table`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from keye.rl.advantages import group_advantages
from keye.rl.losses import agg_loss, masked_mean, truncated_importance_weights
from keye.rl.policy import answer_logprobs
from keye.rl.rollouts import RolloutEngine, RolloutPrompt, Sample, SamplingSettings
from keye.rl.teachers import TeacherRouter, TeacherScores

RewardFn = Callable[[str, Mapping[str, Any]], float]


@dataclass
class MOPDSettings:
    group_size: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    alpha: float = (
        1.0  # weight of the outcome advantage (NeMo-RL orm_advantage_weight); 0 = pure distillation
    )
    scale_rewards: str = "group"  # see keye.rl.advantages.group_advantages
    eps_low: float = 0.5  # gate on pi_theta / mu (tokens outside carry no loss)
    eps_high: float = 2.0
    loss_agg_mode: str = "seq-mean-token-mean"  # the (1/|y|) of eq. 5
    full_vocab_kl: bool = False  # exact reverse KL instead of the sampled log-ratio (same tokenizer)
    micro_batch_size: int = 64
    max_grad_norm: float = 1.0
    stop: tuple[str, ...] = ()
    domains: tuple[str, ...] = field(default_factory=tuple)  # domains always reported (metrics 0 when absent)
    # domain -> share of its groups sampled by its teacher (see the module docstring)
    teacher_sampled: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.eps_low <= 1 <= self.eps_high:
            raise ValueError(
                f"MOPD gate needs 0 < eps_low <= 1 <= eps_high, got [{self.eps_low}, {self.eps_high}]"
            )
        bad = {d: v for d, v in self.teacher_sampled.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"teacher_sampled shares must lie in [0, 1], got {bad}")

    def sampling(self, seed: int | None) -> SamplingSettings:
        return SamplingSettings(
            n=self.group_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            seed=seed,
        )


def mopd_advantages(
    teacher_logprobs: Tensor,
    student_logprobs: Tensor,
    outcome_advantages: Tensor,
    alpha: float,
    teacher_mask: Tensor | None = None,
) -> Tensor:
    """Per-token A_t = sg[log pi_T - log pi_theta] + alpha * A_outcome ([B, L]; A_outcome [B] or [B, L]); the
    distillation part is 0 where the teacher did not score the token."""
    rkl = (teacher_logprobs - student_logprobs).detach()
    if teacher_mask is not None:
        rkl = rkl * teacher_mask.to(rkl.dtype)
    out = outcome_advantages.to(rkl.dtype)
    if out.dim() == 1:
        out = out[:, None]
    return rkl + alpha * out.detach()


def full_vocab_reverse_kl(student_full: Tensor, teacher_full: Tensor) -> Tensor:
    """KL(pi_theta || pi_T) per position [B, L] from whole-vocabulary log-probs [B, L, V]; differentiable in the
    student, the teacher detached."""
    p = student_full.exp()
    return (p * (student_full - teacher_full.detach())).sum(-1)


@dataclass
class MOPDLoss:
    loss: Tensor
    gate_fraction: Tensor  # share of model tokens kept by the gate
    ratio_mean: Tensor


def mopd_loss(
    logprobs: Tensor,
    sampler_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    loss_agg_mode: str = "seq-mean-token-mean",
    reverse_kl: Tensor | None = None,
) -> MOPDLoss:
    """-(w_t * A_t * log pi_theta(y_t)) aggregated over the mask; with `reverse_kl` [B, L] (full-vocab variant,
    A_t then carries only the outcome part) + w_t>0 * KL_t."""
    m = mask.to(logprobs.dtype)
    w = truncated_importance_weights(
        logprobs, sampler_logprobs, m, "token", "mask", threshold=eps_high, threshold_low=eps_low
    )
    per_tok = -(w * advantages.detach() * logprobs)
    if reverse_kl is not None:
        per_tok = per_tok + (w > 0).to(per_tok.dtype) * reverse_kl
    loss = agg_loss(per_tok, m, loss_agg_mode)
    log_ratio = ((logprobs - sampler_logprobs) * m).detach().clamp(-20, 20)
    return MOPDLoss(loss, masked_mean((w > 0).to(m.dtype), m), masked_mean(log_ratio.exp(), m))


def _micro_share(mask: Tensor, idx: Tensor, mode: str) -> float:
    if mode == "token-mean":
        return float(mask[idx].sum() / mask.sum().clamp(min=1))
    if mode == "token-sum":
        return 1.0
    has = (mask.sum(-1) > 0).float()
    return float(has[idx].sum() / has.sum().clamp(min=1))


def _pad(rows: Sequence[Sequence[float]], width: int) -> Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(list(r)[:width])
    return out


def reward_by_domain(table: Mapping[str, RewardFn]) -> RewardFn:
    """One outcome reward routed by reference["domain"] (grounding: time_r1, mcq: mcq, ...)."""

    def reward(text: str, reference: Mapping[str, Any]) -> float:
        d = reference.get("domain")
        if d not in table:
            raise KeyError(f"no outcome reward for domain {d!r}; known: {sorted(table)}")
        return float(table[d](text, reference))

    return reward


def train_on_samples(
    chat: Any,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[RolloutPrompt],
    groups: Sequence[Sequence[Sample]],
    router: TeacherRouter | None,
    settings: MOPDSettings,
    *,
    token_masks: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """One MOPD update on sampled groups (group i answers prompts[i]; rewards already set). `token_masks` (one per
    sample, flat in group order) zero non-model tokens (tool / environment outputs) inside an answer."""
    model = chat.model
    samples = [s for g in groups for s in g]
    if not samples:
        return {"trained_samples": 0.0}
    owner = [prompts[s.group] for s in samples]
    answers = [s.token_ids for s in samples]
    lens = [len(a) for a in answers]
    width = max(1, max(lens))
    device = model.device

    t_teacher = time.perf_counter()
    if router is None:  # outcome-only RL (a specialist): on-policy, this is GRPO's gradient with one epoch
        if settings.full_vocab_kl:
            raise ValueError("full_vocab_kl needs teachers")
        domains = [str(p.reference.get("domain", "all")) for p in owner]
        teach = TeacherScores(torch.zeros(len(samples), width), torch.zeros(len(samples), width))
    else:
        teach, domains = router.score(
            owner, answers, temperature=settings.temperature, full=settings.full_vocab_kl
        )
    teacher_s = time.perf_counter() - t_teacher

    rewards = torch.tensor([s.reward for s in samples])
    gid = torch.tensor([s.group for s in samples])
    outcome = group_advantages(rewards, gid, settings.scale_rewards)
    mask = torch.zeros(len(samples), width)
    for i, n in enumerate(lens):
        mask[i, :n] = 1.0
    if token_masks is not None:
        mask = mask * _pad(token_masks, width)
    tlp = torch.nn.functional.pad(teach.logprobs, (0, width - teach.logprobs.shape[1]))
    tmask = torch.nn.functional.pad(teach.mask, (0, width - teach.mask.shape[1])) * mask
    tfull = None
    if teach.full is not None:
        tfull = torch.nn.functional.pad(teach.full, (0, 0, 0, width - teach.full.shape[1]))
    sampler_lp = _pad([s.logprobs for s in samples], width)
    # teacher-sampled answers: log-likelihood (advantage 1, ratio 1, no distillation or outcome term)
    off = torch.tensor([bool(s.extra.get("teacher_sampled")) for s in samples])
    tmask[off] = 0.0

    order = torch.arange(len(samples))
    micro = [
        order[a : a + settings.micro_batch_size] for a in range(0, len(samples), settings.micro_batch_size)
    ]
    rkl_tok = torch.zeros(len(samples), width)  # per-token reverse KL estimate (or exact), for the metrics
    sums = {"loss": 0.0, "gate_fraction": 0.0, "ratio_mean": 0.0}
    t0 = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for idx in micro:
        il = idx.tolist()
        s = answer_logprobs(
            model,
            [samples[i].prompt for i in il],
            [answers[i] for i in il],
            settings.temperature,
            with_entropy=False,
            with_full=settings.full_vocab_kl,
        )
        pad = width - s.logprobs.shape[1]
        lp = torch.nn.functional.pad(s.logprobs, (0, pad))
        m = mask[idx].to(device)
        tm = tmask[idx].to(device)
        off_rows = off[idx].to(device)
        behaviour = torch.where(off_rows[:, None], lp.detach(), sampler_lp[idx].to(device))
        rkl = None
        if settings.full_vocab_kl:
            sf = torch.nn.functional.pad(s.full, (0, 0, 0, pad))
            rkl = full_vocab_reverse_kl(sf, tfull[idx].to(device)) * tm
            adv = mopd_advantages(
                torch.zeros_like(lp), torch.zeros_like(lp), outcome[idx].to(device), settings.alpha
            )
            rkl_tok[idx] = rkl.detach().cpu()
        else:
            adv = mopd_advantages(tlp[idx].to(device), lp, outcome[idx].to(device), settings.alpha, tm)
            rkl_tok[idx] = ((lp.detach() - tlp[idx].to(device)) * tm).cpu()
        adv = torch.where(off_rows[:, None], torch.ones_like(adv), adv)
        out = mopd_loss(
            lp,
            behaviour,
            adv,
            m,
            eps_low=settings.eps_low,
            eps_high=settings.eps_high,
            loss_agg_mode=settings.loss_agg_mode,
            reverse_kl=rkl,
        )
        share = _micro_share(mask, idx, settings.loss_agg_mode)
        (out.loss * share).backward()
        sums["loss"] += float(out.loss.detach()) * share
        tok_share = float(mask[idx].sum() / mask.sum().clamp(min=1))
        sums["gate_fraction"] += float(out.gate_fraction) * tok_share
        sums["ratio_mean"] += float(out.ratio_mean) * tok_share
    params = [p for p in model.parameters() if p.requires_grad]
    metrics: dict[str, float] = dict(sums)
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
    optimizer.step()
    train_s = time.perf_counter() - t0

    metrics["teacher_seconds"] = teacher_s
    metrics["train_seconds"] = train_s
    metrics["train_tokens_per_s"] = sum(lens) / max(train_s + teacher_s, 1e-9)
    metrics["trained_samples"] = float(len(samples))
    metrics["reverse_kl"] = float(rkl_tok.sum() / tmask.sum().clamp(min=1))
    for d in dict.fromkeys([*settings.domains, *domains]):
        rows = [i for i, x in enumerate(domains) if x == d]
        if not rows:
            metrics.update({f"{d}/reverse_kl": 0.0, f"{d}/reward": 0.0, f"{d}/response_length": 0.0})
            continue
        r = torch.tensor(rows)
        metrics[f"{d}/reverse_kl"] = float(rkl_tok[r].sum() / tmask[r].sum().clamp(min=1))
        metrics[f"{d}/reward"] = float(rewards[r].mean())
        metrics[f"{d}/response_length"] = float(sum(lens[i] for i in rows) / len(rows))
        metrics[f"{d}/samples"] = float(len(rows))
        metrics[f"{d}/teacher_sampled"] = float(off[r].float().mean())
    return metrics


def teacher_sampled_prompts(
    prompts: Sequence[RolloutPrompt], router: TeacherRouter | None, settings: MOPDSettings, seed: int | None
) -> dict[int, str]:
    """prompt index -> domain, for the prompts whose group the domain's teacher samples (a seeded draw per prompt
    against the domain's `teacher_sampled` share)."""
    if router is None or not settings.teacher_sampled:
        return {}
    rng = torch.Generator().manual_seed(0 if seed is None else int(seed) + 17)
    draws = torch.rand(len(prompts), generator=rng).tolist()
    out = {}
    for i, (p, u) in enumerate(zip(prompts, draws, strict=True)):
        d = router.domain_of(p)
        if u < settings.teacher_sampled.get(d, 0.0):
            out[i] = d
    return out


def sampling_teacher(router: TeacherRouter | None, domain: str, chat: Any) -> Any:
    """The domain's teacher, if it can sample for the student: a local checkpoint sharing its tokenizer (the
    teacher's token ids become the student's answer); a clear error otherwise."""
    teacher = router.table.get(domain) if router is not None else None
    t_chat = getattr(teacher, "chat", None)
    if t_chat is None or len(t_chat.tok) != len(chat.tok):
        raise ValueError(
            f"mopd.teacher_sampled.{domain}: needs the domain's teacher to be a checkpoint sharing the student's "
            "tokenizer (an endpoint teacher only scores); drop the domain from teacher_sampled"
        )
    return teacher


def teacher_rollouts(
    chat: Any,
    prompts: Sequence[RolloutPrompt],
    by_teacher: Mapping[int, str],
    router: TeacherRouter | None,
    settings: MOPDSettings,
    seed: int | None,
) -> dict[int, list[Sample]]:
    """Groups sampled by each domain's teacher on its own view of the prompt, re-based on the student's prompt
    (what the student is trained on) and marked teacher_sampled. The teacher must be a local checkpoint sharing
    the student's tokenizer: its token ids become the student's answer."""
    from keye.rl.rollouts import LocalEngine
    from keye.rl.teachers import view_messages

    out: dict[int, list[Sample]] = {}
    for d in dict.fromkeys(by_teacher.values()):
        teacher = sampling_teacher(router, d, chat)
        idx = [i for i, x in by_teacher.items() if x == d]
        views = [
            RolloutPrompt(view_messages(prompts[i], teacher.view), prompts[i].reference, prompts[i].id)
            for i in idx
        ]
        for i, g in zip(idx, LocalEngine(teacher.chat).rollout(views, settings.sampling(seed)), strict=True):
            base = chat.build_prompt(prompts[i].messages)
            for s in g:
                s.prompt, s.extra["teacher_sampled"] = base, True
            out[i] = g
    return out


def mopd_step(
    chat: Any,
    optimizer: torch.optim.Optimizer,
    engine: RolloutEngine,
    next_prompts: Callable[[], list[RolloutPrompt]],
    reward_fn: RewardFn,
    router: TeacherRouter | None,
    settings: MOPDSettings,
    *,
    seed: int | None = None,
) -> dict[str, float]:
    """Sample a group per prompt with the student, reward each answer, score it with its domain's teacher, update;
    returns the metrics (overall and "<domain>/reverse_kl", "<domain>/reward", "<domain>/response_length").
    Without a router it is outcome-only RL (A_t = alpha * A_outcome): how a specialist is trained."""
    prompts = next_prompts()
    for p in prompts if router is not None else ():
        router.domain_of(p)  # an unknown domain fails before any sampling
    t0 = time.perf_counter()
    by_teacher = teacher_sampled_prompts(prompts, router, settings, seed)
    mine = [i for i in range(len(prompts)) if i not in by_teacher]
    groups: list[list[Sample]] = [[] for _ in prompts]
    for i, g in zip(mine, engine.rollout([prompts[i] for i in mine], settings.sampling(seed)), strict=True):
        groups[i] = g
    for i, g in teacher_rollouts(chat, prompts, by_teacher, router, settings, seed).items():
        groups[i] = g
    for i, g in enumerate(groups):
        for s in g:
            s.group = i
    rollout_s = time.perf_counter() - t0
    for g, p in zip(groups, prompts, strict=True):
        for s in g:
            s.reward = float(reward_fn(s.text, p.reference))
    metrics = train_on_samples(chat, optimizer, prompts, groups, router, settings)
    samples = [s for g in groups for s in g]
    metrics["reward_mean"] = sum(s.reward for s in samples) / max(1, len(samples))
    metrics["response_length"] = sum(len(s.token_ids) for s in samples) / max(1, len(samples))
    metrics["rollout_seconds"] = rollout_s
    metrics["rollout_tokens_per_s"] = sum(len(s.token_ids) for s in samples) / max(rollout_s, 1e-9)
    return metrics
