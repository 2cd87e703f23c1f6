"""Rewards for Video-RL, by name: a registry users extend (`@register_reward("name")`, or "package.module:function"
in config), weighted sums of them (`combined_reward`), and the built-ins:

  time_r1_iou   temporal grounding, Time-R1's form IoU * (1 - |s - s'|/T) * (1 - |e - e'|/T)
  span_format   1 when the answer states one well-formed span inside the video (0 <= s < e <= T)
  time_r1       time_r1_iou + span_format (Time-R1: IoU reward plus format reward)
  mcq           1 when the option letter read by the eval's parser (keye.eval.parsing) is the reference letter
  mcq_format    1 when any option letter can be read at all
  caption_f1    word-level F1 of the answer against the reference caption (reference {"caption": ...})

A reward function takes (completion text, reference dict) and returns a float; it never raises on a sloppy or
empty answer (that scores 0). References: grounding {"span": [s, e], "duration": T}; MCQ {"answer": "B",
"options": [...]} (options optional; the parser then also accepts the text of an option).
"""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from keye.eval.parsing import parse_choice, parse_span

RewardFn = Callable[[str, Mapping[str, Any]], float]
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(completion, reference) -> float` available by `name` (a second registration of the same
    name replaces the first, so a user can override a built-in)."""

    def add(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """A registered reward, or "package.module:function" imported on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward {name!r}: cannot import {attr} from {module} ({e})") from e
        _REGISTRY[name] = fn
        return fn
    raise KeyError(
        f"unknown reward {name!r}; registered: {sorted(_REGISTRY)} (or give 'package.module:function')"
    )


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def combined_reward(weights: Mapping[str, float] | str) -> RewardFn:
    """One reward from several: sum of weight * reward over the names (a plain name means weight 1)."""
    spec = {weights: 1.0} if isinstance(weights, str) else dict(weights)
    if not spec:
        raise ValueError("combined_reward needs at least one reward name")
    parts = [(get_reward(n), float(w)) for n, w in spec.items()]

    def reward(completion: str, reference: Mapping[str, Any]) -> float:
        return sum(w * float(fn(completion, reference)) for fn, w in parts)

    return reward


# --------------------------------------------------------------------------------------------- grounding
def _reference_span(reference: Mapping[str, Any]) -> tuple[float, float, float]:
    s, e = (float(x) for x in reference["span"])
    duration = float(reference["duration"])
    if not duration > 0:
        raise ValueError(f"reference duration must be > 0, got {duration}")
    return s, e, duration


def _answer_span(completion: str) -> tuple[float, float] | None:
    try:
        span = parse_span(completion or "")
    except (ValueError, OverflowError):
        return None
    if span is None or not all(math.isfinite(x) for x in span):
        return None
    return span


def temporal_iou(pred: tuple[float, float], gt: tuple[float, float]) -> float:
    """IoU of two [start, end] intervals; a reversed or empty predicted interval scores 0."""
    (ps, pe), (gs, ge) = pred, gt
    if pe <= ps:
        return 0.0
    inter = max(0.0, min(pe, ge) - max(ps, gs))
    union = max(pe, ge) - min(ps, gs)
    return inter / union if union > 0 else 0.0


@register_reward("time_r1_iou")
def time_r1_iou(completion: str, reference: Mapping[str, Any]) -> float:
    """IoU * (1 - |s - s'|/T) * (1 - |e - e'|/T) (Time-R1), the predicted span clipped to [0, T] first."""
    span = _answer_span(completion)
    if span is None:
        return 0.0
    gs, ge, duration = _reference_span(reference)
    ps, pe = (min(max(x, 0.0), duration) for x in span)
    iou = temporal_iou((ps, pe), (gs, ge))
    return iou * (1 - abs(ps - gs) / duration) * (1 - abs(pe - ge) / duration)


@register_reward("span_format")
def span_format(completion: str, reference: Mapping[str, Any]) -> float:
    span = _answer_span(completion)
    if span is None:
        return 0.0
    duration = float(reference.get("duration", math.inf))
    s, e = span
    return 1.0 if 0.0 <= s < e <= duration + 1e-6 else 0.0


@register_reward("time_r1")
def time_r1(completion: str, reference: Mapping[str, Any]) -> float:
    return time_r1_iou(completion, reference) + span_format(completion, reference)


# --------------------------------------------------------------------------------------------- multiple choice
def _choice(completion: str, reference: Mapping[str, Any]) -> str | None:
    options = list(reference.get("options") or [])
    n = int(reference.get("n_options") or len(options) or 4)
    return parse_choice(completion or "", n, options)


@register_reward("mcq")
def mcq_exact(completion: str, reference: Mapping[str, Any]) -> float:
    want = str(reference["answer"]).strip().upper()
    return 1.0 if _choice(completion, reference) == want else 0.0


@register_reward("mcq_format")
def mcq_format(completion: str, reference: Mapping[str, Any]) -> float:
    return 1.0 if _choice(completion, reference) is not None else 0.0


# --------------------------------------------------------------------------------------------- captioning
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", (text or "").lower())


@register_reward("caption_f1")
def caption_f1(completion: str, reference: Mapping[str, Any]) -> float:
    """Word-level F1 (bag of words, as SQuAD's F1) between the answer and reference["caption"]."""
    pred, gold = Counter(_words(completion)), Counter(_words(str(reference["caption"])))
    common = sum((pred & gold).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(gold.values())
    return 2 * precision * recall / (precision + recall)
