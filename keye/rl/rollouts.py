"""Rollout engines: G samples per prompt with their token ids and the sampler's token log-probabilities.

  local   in-process batched generation (keye.model.generate: packed prefill + KV-cache decode) on the policy's
          current weights: the default. The sampler is the trainer, so no importance correction is needed.
  openai  any OpenAI-compatible server (`keye serve`, vLLM, SGLang) over HTTP; it must share the trainer's tokenizer.
          Token ids come from the choice's `token_ids` (keye serve, vLLM `return_token_ids`) or from the logprobs
          tokens written as "token_id:<id>" (vLLM `return_tokens_as_token_ids`); the sampler's logprobs let the
          trainer correct for the mismatch with truncated importance weights (keye.rl.losses).

A prompt is a chat in the OpenAI message format (see keye.serve.chat for the video / image parts) plus the
reference its reward needs. Both engines seed sample k of prompt i with seed + i (keye.serve.batching
.seeded_generator), so the same seed gives the same groups.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class RolloutError(RuntimeError):
    """A rollout request failed (server unreachable, refused, or an answer without token ids)."""


@dataclass
class RolloutPrompt:
    messages: list[dict[str, Any]]  # OpenAI-format chat; the last message is the user's
    reference: dict[str, Any] = field(default_factory=dict)  # what the reward compares with
    id: str = ""


@dataclass
class Sample:
    """One sampled answer. `group` indexes the prompt it answers; `prompt` is the ORIGINAL prompt's model input
    (for a Context-RL recovered sample too: it is trained on log pi(answer | original prompt))."""

    group: int
    token_ids: list[int]
    logprobs: list[float]  # sampler log-probs (tempered distribution), one per token
    text: str
    finish_reason: str  # "stop" | "eos" | "length"
    prompt: Any = None  # keye.model.generate.Prompt of the original prompt
    reward: float = 0.0
    recovered: bool = False  # produced with a Context-RL context
    weight: float = 1.0  # multiplies its tokens' loss (Context-RL recovered_weight)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class SamplingSettings:
    n: int = 8  # group size G
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


class RolloutEngine(Protocol):
    sampler_is_trainer: bool

    def rollout(self, prompts: Sequence[RolloutPrompt], settings: SamplingSettings) -> list[list[Sample]]:
        """One group of settings.n samples per prompt, in prompt order."""
        ...


class LocalEngine:
    """Batched generation on the live policy (a keye.serve.chat.ChatModel wrapping the trainer's model)."""

    sampler_is_trainer = True

    def __init__(self, chat: Any, max_batch_prompts: int = 256) -> None:
        self.chat, self.max_batch = chat, max_batch_prompts

    def rollout(self, prompts: Sequence[RolloutPrompt], settings: SamplingSettings) -> list[list[Sample]]:
        from keye.model.generate import Prompt, generate
        from keye.serve.batching import seeded_generator

        device = self.chat.model.device
        bases = [self.chat.build_prompt(p.messages) for p in prompts]
        rows: list[tuple[int, Any]] = []
        for i, base in enumerate(bases):
            for k in range(settings.n):
                gen = None if settings.seed is None else seeded_generator(settings.seed + i, k, device)
                rows.append(
                    (
                        i,
                        Prompt(
                            base.input_ids,
                            base.pixel_patches,
                            base.patch_grids,
                            stop_strings=list(settings.stop),
                            generator=gen,
                        ),
                    )
                )
        groups: list[list[Sample]] = [[] for _ in prompts]
        for a in range(0, len(rows), self.max_batch):
            chunk = rows[a : a + self.max_batch]
            results = generate(
                self.chat.model,
                [p for _, p in chunk],
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                eos_token_ids=self.chat.eos_ids,
                decode=self.chat.decode,
            )
            for (i, _), r in zip(chunk, results, strict=True):
                groups[i].append(
                    Sample(
                        group=i,
                        token_ids=list(r.token_ids),
                        logprobs=list(r.logprobs),
                        text=r.text or "",
                        finish_reason=r.finish_reason,
                        prompt=bases[i],
                    )
                )
        return groups


def _data_url(frame: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_wire(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """JSON-ready messages: in-process decoded frames become a `video_frames` part of PNG data URLs."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "video" and "times" in part:
                    parts.append(
                        {
                            "type": "video_frames",
                            "frames": [
                                {"time": float(t), "url": _data_url(f)}
                                for t, f in zip(part["times"], part["frames"], strict=True)
                            ],
                        }
                    )
                else:
                    parts.append(dict(part))
            out.append({**m, "content": parts})
        else:
            out.append(dict(m))
    return out


def _token_ids(choice: Mapping[str, Any]) -> list[int]:
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    content = (choice.get("logprobs") or {}).get("content") or []
    ids = []
    for entry in content:
        tok = str(entry.get("token", ""))
        if not tok.startswith("token_id:"):
            raise RolloutError(
                "the server returned neither token_ids nor 'token_id:<id>' logprob tokens "
                "(vLLM: serve with --return-tokens-as-token-ids or send return_token_ids)"
            )
        ids.append(int(tok.split(":", 1)[1]))
    return ids


class OpenAIEngine:
    """Rollouts from an OpenAI-compatible server. `chat` (a ChatModel over the trainer's model and tokenizer) builds
    the original prompt's model input for each sample, so the trainer can score the sampled tokens."""

    sampler_is_trainer = False

    def __init__(
        self,
        base_url: str,
        model: str,
        chat: Any = None,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
        concurrency: int = 8,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.chat = model, chat
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout_s, self.concurrency = timeout_s, concurrency

    def _request(self, client: Any, prompt: RolloutPrompt, i: int, s: SamplingSettings) -> list[Sample]:
        import httpx

        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_wire(prompt.messages),
            "n": s.n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "logprobs": True,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed + i
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise RolloutError(f"{self.url}: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise RolloutError(f"{self.url} answered HTTP {resp.status_code}: {resp.text[:300]}")
        choices = sorted(resp.json()["choices"], key=lambda c: c.get("index", 0))
        base = self.chat.build_prompt(prompt.messages) if self.chat is not None else None
        out = []
        for c in choices:
            ids = _token_ids(c)
            lps = [float(e["logprob"]) for e in (c.get("logprobs") or {}).get("content") or []]
            if len(lps) != len(ids):
                raise RolloutError(f"{self.url}: {len(ids)} token ids but {len(lps)} logprobs in a choice")
            finish = c.get("finish_reason") or "stop"
            out.append(
                Sample(
                    group=i,
                    token_ids=ids,
                    logprobs=lps,
                    text=c["message"].get("content") or "",
                    finish_reason="length" if finish == "length" else "stop",
                    prompt=base,
                )
            )
        return out

    def rollout(self, prompts: Sequence[RolloutPrompt], settings: SamplingSettings) -> list[list[Sample]]:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as client, ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._request, client, p, i, settings) for i, p in enumerate(prompts)]
            return [f.result() for f in futures]


def make_engine(kind: str, chat: Any, **options: Any) -> RolloutEngine:
    """`local` (default; options: max_batch_prompts) or `openai` (options: base_url, model, api_key_env, ...)."""
    if kind == "local":
        return LocalEngine(chat, **options)
    if kind == "openai":
        if "base_url" not in options or "model" not in options:
            raise ValueError("the openai rollout engine needs base_url and model")
        return OpenAIEngine(chat=chat, **options)
    raise ValueError(f"unknown rollout engine {kind!r}; choose local or openai")
