"""The ``openai`` captioner: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, a hosted API).

Frames go as base64 ``image_url`` parts, each preceded by a text part with its clip-relative time (the interleaved
timestamp layout Qwen2.5/3-VL and Keye use), then the prompt. Requests run in a bounded thread pool with
timeouts; 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter (honouring a
``Retry-After`` header); after the last retry the batch fails with ``CaptionerUnavailable`` so the task can be
retried later. A 400/413/422 answer concerns that clip only and gives an error record; 401/403/404 are
configuration errors and raise at once. Message layout follows the OpenAI chat-completions vision format.
"""

from __future__ import annotations

import base64
import io
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from keye.data.captioners.base import (
    CaptionerError,
    CaptionerUnavailable,
    CaptionRecord,
    ClipRef,
    parse_model_answer,
    prompt_identity,
    render_prompt,
    sample_clip_frames,
    timestamp_text,
)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
CLIP_STATUS = frozenset(
    {400, 413, 422}
)  # the request for this clip was refused: an error record, not a crash


class _ClipRefused(Exception):
    pass


def encode_image(frame: np.ndarray, fmt: str = "jpeg", quality: int = 85) -> str:
    """A ``data:`` URL of one RGB uint8 frame."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(frame, mode="RGB")
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    mime = "png" if fmt == "png" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_messages(times: list[float], frames: np.ndarray, prompt: str, fmt: str, quality: int) -> list[dict]:
    content: list[dict[str, Any]] = []
    for t, frame in zip(times, frames, strict=True):
        content.append({"type": "text", "text": timestamp_text(t)})
        content.append({"type": "image_url", "image_url": {"url": encode_image(frame, fmt, quality)}})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def chat_completions_url(base_url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000/v1/chat/completions`` (a full URL is kept as is)."""
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _answer_text(body: dict[str, Any]) -> str:
    content = body["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class OpenAICompatCaptioner:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        prompt: str | None = None,
        prompt_version: str | None = None,
        fps: float = 1.0,
        min_frames: int = 2,
        max_frames: int = 16,
        max_tokens_per_frame: int = 256,
        image_format: str = "jpeg",
        jpeg_quality: int = 85,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int = 512,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if image_format not in ("jpeg", "png"):
            raise ValueError("image_format must be 'jpeg' or 'png'")
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.prompt, self.prompt_version = prompt_identity(prompt, prompt_version)
        self.frame_opts = dict(
            fps=fps, min_frames=min_frames, max_frames=max_frames, max_tokens_per_frame=max_tokens_per_frame
        )
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.concurrency = concurrency
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.extra_body = dict(extra_body or {})
        self._rng = random.Random(0)
        self._rng_lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
        return headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        with self._rng_lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        delay = min(self.backoff_max_s, self.backoff_s * (2**attempt)) * jitter
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.backoff_max_s))
            except ValueError:
                pass
        return delay

    def _post(self, client: httpx.Client, payload: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """POST with retries; returns (json body, attempts used)."""
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = client.post(self.url, json=payload, headers=self._headers())
            except httpx.TimeoutException as e:
                last = f"timeout ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {e})"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json(), attempt + 1
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON"
                elif resp.status_code in RETRY_STATUS:
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    retry_after = resp.headers.get("retry-after")
                elif resp.status_code in CLIP_STATUS:
                    raise _ClipRefused(
                        f"endpoint refused the request: HTTP {resp.status_code}: {resp.text[:300]}"
                    )
                else:
                    raise CaptionerError(
                        f"{self.url} answered HTTP {resp.status_code} ({resp.text[:200]}); "
                        f"check base_url, model {self.model!r} and the API key in ${self.api_key_env}"
                    )
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise CaptionerUnavailable(
            f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}"
        )

    def _one(self, client: httpx.Client, clip: ClipRef) -> CaptionRecord:
        fail = lambda why: CaptionRecord.failed(clip, self.name, self.model, self.prompt_version, why)
        try:
            times, frames = sample_clip_frames(clip, **self.frame_opts)
        except Exception as e:  # any decode failure concerns this clip only
            return fail(f"cannot sample frames of {clip.video_path} [{clip.start:.2f}, {clip.end:.2f}]: {e}")
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": build_messages(
                times, frames, render_prompt(self.prompt, clip), self.image_format, self.jpeg_quality
            ),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        t0 = time.perf_counter()
        try:
            body, attempts = self._post(client, payload)
        except _ClipRefused as e:
            return fail(str(e))
        try:
            text = _answer_text(body)
        except (KeyError, IndexError, TypeError):
            return fail(f"endpoint answer has no choices[0].message.content: {str(body)[:200]}")
        caption, dense, how = parse_model_answer(text, clip.duration)
        if not caption:
            return fail("the model returned an empty caption")
        meta = {
            "frame_times": [round(t, 3) for t in times],
            "frame_size": [int(frames.shape[1]), int(frames.shape[2])],
            "parsed_as": how,
            "attempts": attempts,
            "latency_s": round(time.perf_counter() - t0, 3),
        }
        if isinstance(body.get("usage"), dict):
            meta["usage"] = body["usage"]
        return CaptionRecord(
            clip.clip_id,
            self.name,
            self.model,
            self.prompt_version,
            caption=caption,
            dense_captions=dense,
            meta=meta,
        )

    def caption(self, clips: list[ClipRef]) -> list[CaptionRecord]:
        if not clips:
            return []
        with (
            httpx.Client(timeout=self.timeout) as client,
            ThreadPoolExecutor(max_workers=min(self.concurrency, len(clips))) as pool,
        ):
            futures = [pool.submit(self._one, client, clip) for clip in clips]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:  # the endpoint is gone: do not start the clips still queued
                    f.cancel()
                raise
