"""A predict_fn for `keye.eval.evaluate` backed by an OpenAI-compatible server (`keye serve`, or any server that
accepts keye's `video_url` part with a local path and time range): the same system prompt and benchmark wording
as keye/eval/predict.py, greedy, seeded, through the official `openai` client. The server plans the frames with
its checkpoint's own policy, so a checkpoint scores the same served or loaded in process."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from keye.data.prompts import SYSTEM_PROMPT
from keye.eval.prompts import question_messages
from keye.eval.readers import Question
from keye.eval.runner import PredictFn


def endpoint_predict_fn(
    base_url: str,
    model: str,
    *,
    max_new_tokens: int = 32,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    timeout_s: float = 600.0,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> PredictFn:
    """Answer questions through the server's /v1/chat/completions; a refused request (4xx) is an error naming
    the question, a network failure is retried by the client (max_retries) and then an error."""
    import openai

    client = openai.OpenAI(
        base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout_s, max_retries=2
    )

    def one(q: Question) -> str:
        try:
            resp = client.chat.completions.create(
                model=model,
                messages=question_messages(q, system_prompt),
                temperature=0.0,
                max_tokens=max_new_tokens,
                seed=0,
            )
        except openai.APIStatusError as e:
            raise ValueError(
                f"{base_url} refused question {q.id} ({q.video}): HTTP {e.status_code} {e.message}"
            ) from e
        return resp.choices[0].message.content or ""

    def predict(questions: list[Question], blank_frames: bool = False) -> list[str]:
        if blank_frames:
            raise ValueError(
                "the blank-frame control needs the checkpoint in process (eval.blank_control: false)"
            )
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, questions))

    return predict
