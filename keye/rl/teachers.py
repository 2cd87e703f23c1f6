"""MOPD teachers: frozen models that re-score a student's sampled tokens under the teacher's OWN view of the prompt.

One interface (`Teacher.score(prompts, answers)` -> per-token log-probs and the tokens it could score), three
implementations of where the numbers come from:

  CheckpointTeacher  a keye checkpoint loaded frozen and scored in process (keye.rl.policy.answer_logprobs); it can
                     also give the whole vocabulary's log-probs for the exact reverse-KL variant (same tokenizer).
  EndpointTeacher    any OpenAI-compatible server that returns prompt logprobs (`keye serve`, vLLM): the prompt and
                     answer are sent as one prompt and vLLM's `prompt_logprobs` of the answer tokens are read back.

and two views of a prompt (`view`):

  video  the prompt as the student sees it (frames included)
  text   every visual part (video, frames, image) replaced by the clip's transcript: its caption and dense captions
         in time order, given as plain text in the prompt's reference["transcript"] (transcript_text builds it from a
         sidecar annotation or a CaptionSet's captions). The teacher never receives a frame.

Routing (`TeacherRouter`): each prompt goes to the ONE teacher of its domain (reference["domain"]); teachers are
never averaged, and a domain without a teacher is an error naming it and the known ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from keye.rl.rollouts import RolloutError, RolloutPrompt, to_wire

VIEWS = ("video", "text")
_VISUAL_PARTS = ("video", "video_url", "video_frames", "image_url", "image")


@dataclass
class TeacherScores:
    logprobs: Tensor  # [B, L] log pi_teacher(y_t | teacher's view, y_<t), 0 where not scored
    mask: Tensor  # [B, L] float, 1 where the teacher scored the token
    full: Tensor | None = None  # [B, L, V] whole-vocabulary log-probs (CheckpointTeacher with full=True)


class Teacher(Protocol):
    name: str
    view: str

    def score(
        self,
        prompts: Sequence[RolloutPrompt],
        answers: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        full: bool = False,
    ) -> TeacherScores: ...


# ------------------------------------------------------------------------------------------------ views
def transcript_text(caption: str | None = None, dense_captions: Sequence[Mapping[str, Any]] = ()) -> str:
    """The text a text teacher reads in place of the frames: the caption, then one line per dense caption
    "[s - e s] text" in time order (the fields of the synthetic sidecar <stem>.json and of CaptionSet records)."""
    lines = [caption.strip()] if caption and caption.strip() else []
    for d in sorted(dense_captions, key=lambda d: (float(d["start"]), float(d["end"]))):
        lines.append(f"[{float(d['start']):.1f} - {float(d['end']):.1f} s] {str(d['text']).strip()}")
    if not lines:
        raise ValueError("transcript_text: no caption and no dense captions to build a transcript from")
    return "\n".join(lines)


def view_messages(prompt: RolloutPrompt, view: str) -> list[dict[str, Any]]:
    """The prompt's messages as a teacher of `view` reads them."""
    if view == "video":
        return list(prompt.messages)
    if view != "text":
        raise ValueError(f"teacher view must be one of {VIEWS}, got {view!r}")
    transcript = prompt.reference.get("transcript")
    if not isinstance(transcript, str) or not transcript.strip():
        raise ValueError(
            f"prompt {prompt.id or '?'}: a text teacher needs the clip's transcript in reference['transcript'] "
            "(keye.rl.teachers.transcript_text from its captions / dense captions)"
        )
    out = []
    for m in prompt.messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") in _VISUAL_PARTS:
                    parts.append({"type": "text", "text": f"Video transcript:\n{transcript}\n"})
                else:
                    parts.append(part)
            out.append({**m, "content": parts})
        else:
            out.append(dict(m))
    return out


def _pad_rows(rows: Sequence[Sequence[float]], width: int) -> tuple[Tensor, Tensor]:
    lp, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        for j, v in enumerate(r[:width]):
            if v is not None:
                lp[i, j], mask[i, j] = float(v), 1.0
    return lp, mask


# ------------------------------------------------------------------------------------------------ checkpoint
class CheckpointTeacher:
    """A frozen keye model (in a keye.serve.chat.ChatModel for its tokenizer and frame sampler)."""

    def __init__(self, chat: Any, *, view: str = "video", name: str = "") -> None:
        if view not in VIEWS:
            raise ValueError(f"teacher view must be one of {VIEWS}, got {view!r}")
        self.chat, self.view, self.name = chat, view, name or getattr(chat, "name", "teacher")
        chat.model.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: Any, *, view: str = "video", name: str = "", device: str = "cpu", **kw: Any
    ) -> CheckpointTeacher:
        from keye.serve.chat import ChatModel

        chat = ChatModel.from_checkpoint(checkpoint_dir, device=device, **kw)
        return cls(chat, view=view, name=name or chat.name)

    def score(
        self,
        prompts: Sequence[RolloutPrompt],
        answers: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        full: bool = False,
    ) -> TeacherScores:
        from keye.rl.policy import answer_logprobs

        built = [self.chat.build_prompt(view_messages(p, self.view)) for p in prompts]
        with torch.no_grad():
            s = answer_logprobs(
                self.chat.model, built, answers, temperature, with_entropy=False, with_full=full
            )
        return TeacherScores(s.logprobs.cpu(), s.mask.cpu(), None if s.full is None else s.full.cpu())


# ------------------------------------------------------------------------------------------------ endpoint
class EndpointTeacher:
    """A teacher behind an OpenAI-compatible server that returns prompt logprobs (`keye serve`, vLLM).

    Prompts without frames in the teacher's view go to /v1/completions as token ids (prompt + answer, rendered by
    `chat`, which must share the server's tokenizer), with vLLM's `prompt_logprobs: 0`: exact ids, nothing
    re-tokenized. Prompts with frames go to /v1/chat/completions with the answer as a final assistant message,
    `continue_final_message`, `add_generation_prompt: false`, `echo` and `prompt_logprobs`; the tail of the
    returned prompt_token_ids must be the answer's ids (tokens the server dropped, e.g. a final eos, stay
    unscored), else the request fails naming the prompt."""

    def __init__(
        self,
        base_url: str,
        model: str,
        chat: Any,
        *,
        view: str = "video",
        name: str = "",
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 600.0,
    ) -> None:
        if view not in VIEWS:
            raise ValueError(f"teacher view must be one of {VIEWS}, got {view!r}")
        self.base = base_url.rstrip("/")
        self.model, self.chat, self.view, self.name = model, chat, view, name or model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout_s = timeout_s

    def _post(self, client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = client.post(self.base + path, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise RolloutError(f"teacher {self.name}: {self.base}{path}: {type(e).__name__}: {e}") from e
        if resp.status_code != 200:
            raise RolloutError(
                f"teacher {self.name}: {self.base}{path} answered HTTP {resp.status_code}: {resp.text[:300]}"
            )
        return resp.json()

    @staticmethod
    def _token_logprob(entry: Any, tid: int) -> float | None:
        if not isinstance(entry, Mapping):
            return None
        got = entry.get(str(tid), entry.get(tid))
        if got is None:
            return None
        return float(got["logprob"] if isinstance(got, Mapping) else got)

    def _one(self, client: Any, prompt: RolloutPrompt, answer: Sequence[int], temperature: float) -> list:
        messages = view_messages(prompt, self.view)
        has_media = any(
            isinstance(m.get("content"), list) and any(p.get("type") in _VISUAL_PARTS for p in m["content"])
            for m in messages
        )
        answer = [int(t) for t in answer]
        if not answer:
            return []
        if not has_media:
            base = [int(t) for t in self.chat.build_prompt(messages).input_ids.tolist()]
            body = {
                "model": self.model,
                "prompt": base + answer,
                "max_tokens": 1,
                "temperature": temperature,
                "prompt_logprobs": 0,
            }
            choice = self._post(client, "/completions", body)["choices"][0]
            entries = (choice.get("prompt_logprobs") or [])[len(base) :]
            ids = answer
        else:
            text = self.chat.decode(answer)
            body = {
                "model": self.model,
                "messages": [*to_wire(messages), {"role": "assistant", "content": text}],
                "add_generation_prompt": False,
                "continue_final_message": True,
                "echo": True,
                "max_tokens": 1,
                "temperature": temperature,
                "prompt_logprobs": 0,
            }
            out = self._post(client, "/chat/completions", body)
            ids = out.get("prompt_token_ids") or out["choices"][0].get("prompt_token_ids")
            entries = out.get("prompt_logprobs") or out["choices"][0].get("prompt_logprobs")
            if ids is None or entries is None:
                raise RolloutError(
                    f"teacher {self.name}: the server returned no prompt_token_ids / prompt_logprobs "
                    "(vLLM: send prompt_logprobs and return_token_ids)"
                )
            keep = len(answer)
            while keep and ids[len(ids) - keep :] != answer[:keep]:
                keep -= 1  # tokens at the end the server's re-tokenization dropped (eos)
            if keep == 0 or keep < len(answer) - 1:
                raise RolloutError(
                    f"teacher {self.name}: prompt {prompt.id or '?'}: the server re-tokenized the answer "
                    "differently; a teacher endpoint must share the student's tokenizer"
                )
            entries, ids = entries[len(ids) - keep :], answer[:keep]
        return [self._token_logprob(e, t) for e, t in zip(entries, ids, strict=False)]

    def score(
        self,
        prompts: Sequence[RolloutPrompt],
        answers: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        full: bool = False,
    ) -> TeacherScores:
        import httpx

        if full:
            raise ValueError(
                f"teacher {self.name}: an endpoint returns sampled-token logprobs only; the full-vocabulary "
                "reverse KL needs a checkpoint teacher"
            )
        with httpx.Client(timeout=self.timeout_s) as client:
            rows = [self._one(client, p, a, temperature) for p, a in zip(prompts, answers, strict=True)]
        width = max((len(a) for a in answers), default=0)
        lp, mask = _pad_rows(rows, width)
        return TeacherScores(lp, mask)


# ------------------------------------------------------------------------------------------------ routing
class UnknownDomainError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


class TeacherRouter:
    """domain -> teacher; every prompt is scored by its own domain's teacher only."""

    def __init__(self, table: Mapping[str, Teacher]) -> None:
        if not table:
            raise ValueError("MOPD needs at least one domain -> teacher entry")
        self.table = dict(table)

    def domain_of(self, prompt: RolloutPrompt) -> str:
        d = prompt.reference.get("domain")
        if d not in self.table:
            raise UnknownDomainError(
                f"prompt {prompt.id or '?'}: domain {d!r} has no teacher; known domains: {sorted(self.table)} "
                "(add it to the routing table or drop its prompts)"
            )
        return str(d)

    def score(
        self,
        prompts: Sequence[RolloutPrompt],
        answers: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        full: bool = False,
    ) -> tuple[TeacherScores, list[str]]:
        """Scores of every (prompt, answer) by its domain's teacher, in input order, and each row's domain."""
        domains = [self.domain_of(p) for p in prompts]
        width = max((len(a) for a in answers), default=0)
        lp, mask = torch.zeros(len(prompts), width), torch.zeros(len(prompts), width)
        full_out: Tensor | None = None
        for d in dict.fromkeys(domains):
            idx = [i for i, x in enumerate(domains) if x == d]
            s = self.table[d].score(
                [prompts[i] for i in idx], [answers[i] for i in idx], temperature=temperature, full=full
            )
            w = s.logprobs.shape[1]
            lp[idx, :w], mask[idx, :w] = s.logprobs, s.mask
            if full:
                assert s.full is not None
                if full_out is None:
                    full_out = torch.zeros(len(prompts), width, s.full.shape[-1])
                if s.full.shape[-1] != full_out.shape[-1]:
                    raise ValueError(
                        f"teacher {self.table[d].name}: vocabulary of {s.full.shape[-1]} tokens, another teacher "
                        f"has {full_out.shape[-1]}; the full-vocabulary KL needs teachers sharing the tokenizer"
                    )
                full_out[idx, :w] = s.full
        return TeacherScores(lp, mask, full_out), domains
