"""Context-RL: a learning signal from groups in which every sampled answer failed.

For such a group (every reward below `success_threshold`), a context is built from the reference: a hint derived
from the reference answer ("hint"), or a mistake report on the best failed sample plus that hint
("mistake_report", ContextRL arXiv 2602.22623). The policy answers again with the context appended to the last
user turn; answers that now succeed are "recovered" and join their group, but are trained on
log pi(answer | ORIGINAL prompt): the context is never seen at test time (SAGE), so the model must learn to give the
answer without it.

How recovered samples are weighted and normalised (keye.rl.grpo applies this; docs/TRAINING.md "Context-RL"):
  1. At most `max_recovered` per group (default G // 2, best reward first), so failures still outnumber or equal
     them and the group keeps a contrast.
  2. Advantages are computed over the union of the group's G failed samples and its K recovered ones, with the
     run's `scale_rewards` (LUFFY's mixed normalisation): with rewards 0 (failures) and 1 (recovered) and
     "group" scaling, A_fail = -K / (G + K) / std and A_rec = G / (G + K) / std, std the unbiased std of the union.
  3. Each recovered token's surrogate is multiplied by `recovered_weight` (default 1.0) through the loss's
     token_weights; the loss aggregation (loss_agg_mode) is the run's, over all tokens of the batch.
  4. The importance ratio of a recovered sample is taken against the trainer's own log pi(answer | original prompt)
     at the update (pi_old := pi_theta detached; ratio 1 at the first epoch, clipped as usual in later ones). No
     ratio to the context-conditioned sampler is used (pi(y|x) / pi(y|x, c) is tiny for answers found only with
     help and would erase the signal), and no sampler importance weight applies to them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from keye.rl.rollouts import RolloutEngine, RolloutPrompt, Sample, SamplingSettings

CONTEXT_KINDS = ("hint", "mistake_report")


@dataclass
class ContextRLSettings:
    success_threshold: float = 0.5  # a sample succeeds when its reward >= this
    context: str = "hint"  # "hint" | "mistake_report"
    hint_level: str = "answer"  # "answer": the reference answer itself; "partial": a coarser hint
    resample_n: int | None = None  # answers drawn with the context (default: the group size)
    recovered_weight: float = 1.0
    max_recovered: int | None = None  # per group; default group_size // 2

    def __post_init__(self) -> None:
        if self.context not in CONTEXT_KINDS:
            raise ValueError(f"context_rl.context must be one of {CONTEXT_KINDS}, got {self.context!r}")
        if self.hint_level not in ("answer", "partial"):
            raise ValueError(f"context_rl.hint_level must be answer or partial, got {self.hint_level!r}")
        if self.recovered_weight < 0:
            raise ValueError("context_rl.recovered_weight must be >= 0")


def _span_text(s: float, e: float) -> str:
    return f"{s:.1f} - {e:.1f} seconds"


def hint_text(reference: Mapping[str, Any], level: str = "answer") -> str:
    """A hint from the reference: an explicit reference["hint"] wins; spans and MCQ answers have built-in hints;
    otherwise reference["answer_text"] / ["answer"]. "partial" gives a coarser hint (a span widened to whole
    seconds plus a margin of a tenth of the video; half of the wrong options ruled out)."""
    if reference.get("hint"):
        return str(reference["hint"])
    if "span" in reference:
        s, e = (float(x) for x in reference["span"])
        if level == "partial":
            t = float(reference.get("duration") or e)
            pad = 0.1 * t
            lo, hi = max(0.0, math.floor(s - pad)), min(t, math.ceil(e + pad))
            return f"Hint: the event happens somewhere between {lo:.1f} and {hi:.1f} seconds."
        return f"Hint: the event happens in {_span_text(s, e)}."
    if "answer" in reference:
        letter = str(reference["answer"]).strip().upper()
        options = list(reference.get("options") or [])
        if level == "partial" and options:
            letters = "ABCDEFGH"[: len(options)]
            wrong = [x for x in letters if x != letter][: max(1, (len(options) - 1) // 2)]
            return f"Hint: the answer is not {' or '.join(wrong)}."
        idx = "ABCDEFGH".find(letter)
        said = f" ({options[idx]})" if 0 <= idx < len(options) else ""
        return f"Hint: the answer is {letter}{said}."
    if "answer_text" in reference:
        return f"Hint: the answer is {reference['answer_text']}."
    raise ValueError("cannot derive a hint: the reference has no hint, span, answer or answer_text")


def mistake_report(failed: Sample, reference: Mapping[str, Any], level: str = "answer") -> str:
    """What the best failed answer got wrong, then the hint."""
    said = failed.text.strip() or "(nothing)"
    detail = ""
    if "span" in reference:
        from keye.eval.parsing import parse_span

        span = parse_span(failed.text)
        s, e = (float(x) for x in reference["span"])
        if span is None:
            detail = " It does not state a time span as 'start - end seconds'."
        elif span[1] <= span[0]:
            detail = " Its span ends before it starts."
        else:
            where = (
                "too early" if span[1] <= s else "too late" if span[0] >= e else "not aligned with the event"
            )
            detail = f" Its span {_span_text(*span)} is {where}."
    return (
        f'Your previous answer was: "{said[:200]}". It is wrong (reward {failed.reward:.2f}).{detail} '
        + hint_text(reference, level)
    )


def with_context(messages: Sequence[Mapping[str, Any]], context: str) -> list[dict[str, Any]]:
    """A copy of the chat with `context` appended to the last user turn."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                m["content"] = list(content) + [{"type": "text", "text": "\n" + context}]
            else:
                m["content"] = f"{content or ''}\n{context}"
            return out
    out.append({"role": "user", "content": context})
    return out


def failed_groups(groups: Sequence[Sequence[Sample]], threshold: float) -> list[int]:
    """Indices of groups whose every sample's reward is below `threshold`."""
    return [i for i, g in enumerate(groups) if g and all(s.reward < threshold for s in g)]


@dataclass
class RecoveryStats:
    failed_groups: int = 0
    recovered_groups: int = 0
    recovered_samples: int = 0


def recover(
    engine: RolloutEngine,
    prompts: Sequence[RolloutPrompt],
    groups: list[list[Sample]],
    reward_fn: Callable[[str, Mapping[str, Any]], float],
    settings: ContextRLSettings,
    sampling: SamplingSettings,
) -> RecoveryStats:
    """Resample every all-failed group with a context; successful answers are appended to their group (in place),
    marked recovered, weighted, and pointed at the ORIGINAL prompt's model input."""
    failed = failed_groups(groups, settings.success_threshold)
    stats = RecoveryStats(failed_groups=len(failed))
    if not failed:
        return stats
    ctx_prompts, contexts = [], []
    for i in failed:
        ref = prompts[i].reference
        if settings.context == "hint":
            text = hint_text(ref, settings.hint_level)
        else:
            text = mistake_report(max(groups[i], key=lambda s: s.reward), ref, settings.hint_level)
        contexts.append(text)
        ctx_prompts.append(RolloutPrompt(with_context(prompts[i].messages, text), ref, prompts[i].id))
    n = settings.resample_n or sampling.n
    seed = None if sampling.seed is None else sampling.seed + 7919
    redo = engine.rollout(ctx_prompts, replace(sampling, n=n, seed=seed))
    cap = (
        settings.max_recovered if settings.max_recovered is not None else max(1, len(groups[failed[0]]) // 2)
    )
    for i, text, new in zip(failed, contexts, redo, strict=True):
        for s in new:
            s.reward = float(reward_fn(s.text, prompts[i].reference))
        good = sorted((s for s in new if s.reward >= settings.success_threshold), key=lambda s: -s.reward)[
            :cap
        ]
        for s in good:
            s.group, s.recovered, s.weight = i, True, settings.recovered_weight
            s.prompt = groups[i][0].prompt  # trained on log pi(answer | ORIGINAL prompt)
            s.extra = {**copy.copy(s.extra), "context": text}
        groups[i].extend(good)
        stats.recovered_groups += bool(good)
        stats.recovered_samples += len(good)
    return stats
