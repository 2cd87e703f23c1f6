"""The OpenAI-compatible HTTP API (FastAPI + uvicorn): `/v1/chat/completions` and `/v1/models` over one keye
checkpoint, so the `openai` captioner, `keye eval`, RL rollouts and any OpenAI client can use our own models.

Request fields: model, messages (see keye.serve.chat for the content parts), n, temperature, top_p, max_tokens
(or max_completion_tokens), stop, seed, logprobs, top_logprobs, and vLLM's return_tokens_as_token_ids (then each
logprobs token reads "token_id:<id>"); tools + tool_choice "auto" | "none" (the Qwen / Hermes tool block of the
chat template; an answer whose every <tool_call> block is a well-formed call of an offered tool comes back as the
choice's `tool_calls` with finish_reason "tool_calls", anything else as plain content). Every choice also carries `token_ids` (the generated ids, eos included),
as vLLM's `return_token_ids` gives them; logprobs are those of the sampled distribution (after temperature,
before top-p), what RL needs to correct for the sampler. vLLM's scoring extras are accepted too: `prompt_logprobs`
(k: each prompt token's log-prob, rank and the top k, keye.serve.scoring), `echo`, `add_generation_prompt` and
`continue_final_message` (the last assistant message is continued, not answered: send an answer to have it
scored); `/v1/completions` takes a text or token-id prompt (no chat template) with the same extras. A request that cannot be served as given is answered 400
(404 for an unknown model) with an OpenAI-style {"error": {"message", "type", "param"}} body; streaming is not
offered (400). Requests are batched by keye.serve.batching.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from keye.serve.batching import GenerationBatcher, seeded_generator
from keye.serve.chat import ChatModel, ChatRequestError
from keye.serve.scoring import prompt_logprobs

MAX_N = 64
MAX_NEW_TOKENS = 4096


def _check_stops(v: str | list[str] | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop: at most 4 non-empty strings")
    return stops


class ChatCompletionRequest(BaseModel):
    """The accepted subset of OpenAI's chat-completions body; unknown fields are ignored as OpenAI clients send
    some we do not use (user, metadata, ...)."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    return_tokens_as_token_ids: bool = False
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM extra
    echo: bool = False  # vLLM extra: the continued final message is prepended to the answer
    add_generation_prompt: bool = True  # vLLM extra
    continue_final_message: bool = False  # vLLM extra

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        return _check_stops(v)


class CompletionRequest(BaseModel):
    """The accepted subset of the legacy completions body (a text or token-id prompt, no chat template), with
    vLLM's `prompt_logprobs`; `max_tokens` 0 only scores the prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    prompt: str | list[int]
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=0, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        return _check_stops(v)


def _text_of(content: Any) -> str | None:
    """The text of a message's content (a string or text parts), None when it holds anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": status}},
    )


def _tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]] | None:
    """(content, OpenAI tool_calls) when the answer holds calls and every one is a well-formed call of an offered
    tool; None otherwise (the answer is returned as plain text, as vLLM's hermes parser does)."""
    from keye.agent.tool_calls import ToolCall, parse_tool_calls, tool_name

    turn = parse_tool_calls(text, None)
    names = {tool_name(t) for t in tools}
    if not turn.calls or not all(isinstance(c, ToolCall) and c.name in names for c in turn.calls):
        return None
    return turn.content, [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in turn.calls
        if isinstance(c, ToolCall)
    ]


def create_app(
    chat: ChatModel, *, window_s: float = 0.01, max_batch_prompts: int = 64, default_max_tokens: int = 256
) -> Any:
    import torch
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from keye.model.generate import Prompt

    batcher = GenerationBatcher(
        chat.model, chat.decode, chat.eos_ids, window_s=window_s, max_batch_prompts=max_batch_prompts
    )
    app = FastAPI(title="keye serve", version="1")
    app.state.batcher, app.state.chat = batcher, chat
    app.router.add_event_handler("shutdown", batcher.close)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        errs = exc.errors()
        parts = []
        for e in errs[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        first = ".".join(str(x) for x in errs[0].get("loc", ()) if x != "body") if errs else None
        return _error(400, "; ".join(parts) or "invalid request", first)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        return _error(
            exc.status_code,
            str(exc.detail),
            kind="not_found_error" if exc.status_code == 404 else "invalid_request_error",
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": chat.name, "object": "model", "created": 0, "owned_by": "keye"}],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness plus how the batcher has batched so far (generate calls, largest batch in prompts)."""
        return {"status": "ok", "batches": batcher.batches, "largest_batch": batcher.max_seen}

    def token_entry(tid: int, logprob: float, as_ids: bool) -> dict[str, Any]:
        text = f"token_id:{tid}" if as_ids else chat.token_text(tid)
        return {"token": text, "logprob": logprob, "bytes": list(chat.token_text(tid).encode("utf-8"))}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        if req.stream:
            return _error(400, "stream: streaming responses are not supported by keye serve", "stream")
        if req.model and req.model != chat.name:
            return _error(
                404,
                f"model {req.model!r} is not served here; GET /v1/models lists {chat.name!r}",
                "model",
                "not_found_error",
            )
        if req.top_logprobs and not req.logprobs:
            return _error(400, "top_logprobs: requires logprobs=true", "top_logprobs")
        if req.tool_choice not in (None, "auto", "none"):
            return _error(
                400,
                'tool_choice: only "auto" and "none" are supported (no constrained decoding)',
                "tool_choice",
            )
        messages, final = req.messages, None
        if req.continue_final_message:
            last = messages[-1] if isinstance(messages[-1], dict) else {}
            final = _text_of(last.get("content")) if last.get("role") == "assistant" else None
            if final is None:
                return _error(
                    400,
                    "continue_final_message: the last message must be an assistant message with text content",
                    "continue_final_message",
                )
            messages = messages[:-1]
        elif not req.add_generation_prompt:
            return _error(
                400,
                "add_generation_prompt: false is only served with continue_final_message: true",
                "add_generation_prompt",
            )
        try:
            base = await run_in_threadpool(
                chat.build_prompt, messages, tools=req.tools, continue_final=final or None
            )
        except ChatRequestError as e:
            return _error(400, str(e), "tools" if str(e).startswith("tools") else "messages")
        max_new = req.max_completion_tokens or req.max_tokens or default_max_tokens
        limit = chat.model.config.lm.max_position_embeddings
        if len(base.input_ids) + max_new > limit:
            return _error(
                400,
                f"the prompt ({len(base.input_ids)} tokens) plus max_tokens ({max_new}) exceeds the model's "
                f"context of {limit} tokens",
                "max_tokens",
            )
        prompts = []
        for k in range(req.n):
            gen = None if req.seed is None else seeded_generator(req.seed, k, chat.model.device)
            prompts.append(
                Prompt(
                    input_ids=base.input_ids,
                    pixel_patches=base.pixel_patches,
                    patch_grids=base.patch_grids,
                    max_new_tokens=max_new,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    stop_strings=req.stop,
                    generator=gen,
                )
            )
        top = req.top_logprobs or 0
        scored = None
        if req.prompt_logprobs is not None:
            scored = await run_in_threadpool(
                prompt_logprobs, chat.model, base, req.prompt_logprobs, chat.token_text
            )
        results = await asyncio.wrap_future(batcher.submit(prompts, top_logprobs=top if req.logprobs else 0))
        choices = []
        for k, r in enumerate(results):
            logprobs = None
            if req.logprobs:
                content = []
                tops = r.extra.get("top_logprobs", [])
                for i, (tid, lp) in enumerate(zip(r.token_ids, r.logprobs, strict=True)):
                    entry = token_entry(tid, lp, req.return_tokens_as_token_ids)
                    entry["top_logprobs"] = (
                        [token_entry(t, v, req.return_tokens_as_token_ids) for t, v in tops[i][:top]]
                        if top
                        else []
                    )
                    content.append(entry)
                logprobs = {"content": content}
            text = r.text if r.text is not None else chat.decode(r.token_ids)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": (final if req.echo and final else "") + text,
            }
            finish = "length" if r.finish_reason == "length" else "stop"
            calls = _tool_calls(text, req.tools) if req.tools and req.tool_choice != "none" else None
            if calls is not None and finish != "length":
                message = {"role": "assistant", "content": calls[0] or None, "tool_calls": calls[1]}
                finish = "tool_calls"
            choices.append(
                {
                    "index": k,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": logprobs,
                    "token_ids": list(r.token_ids),
                }
            )
        n_prompt = len(base.input_ids)
        n_out = sum(len(r.token_ids) for r in results)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
            },
            "prompt_token_ids": [int(t) for t in base.input_ids.tolist()],
            "prompt_logprobs": scored,
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        if req.stream:
            return _error(400, "stream: streaming responses are not supported by keye serve", "stream")
        if req.model and req.model != chat.name:
            return _error(
                404,
                f"model {req.model!r} is not served here; GET /v1/models lists {chat.name!r}",
                "model",
                "not_found_error",
            )
        if req.logprobs is not None:
            return _error(
                400,
                "logprobs: the legacy completion logprobs are not served; use /v1/chat/completions with "
                "logprobs, or prompt_logprobs here",
                "logprobs",
            )
        if isinstance(req.prompt, str):
            ids = [int(t) for t in chat.tok.encode(req.prompt)]
        else:
            ids = [int(t) for t in req.prompt]
            vocab = chat.model.config.lm.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab or t == chat.model.config.image_token_id]
            if bad:
                return _error(
                    400,
                    f"prompt: token ids must lie in [0, {vocab}) and not be the frame placeholder; got {bad[:5]}",
                    "prompt",
                )
        if not ids:
            return _error(400, "prompt: empty", "prompt")
        limit = chat.model.config.lm.max_position_embeddings
        if len(ids) + req.max_tokens > limit:
            return _error(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                f"context of {limit} tokens",
                "max_tokens",
            )
        base = Prompt(input_ids=torch.tensor(ids, dtype=torch.int64))
        scored = None
        if req.prompt_logprobs is not None:
            scored = await run_in_threadpool(
                prompt_logprobs, chat.model, base, req.prompt_logprobs, chat.token_text
            )
        results = []
        if req.max_tokens > 0:
            prompts = [
                Prompt(
                    input_ids=base.input_ids,
                    max_new_tokens=req.max_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    stop_strings=req.stop,
                    generator=None if req.seed is None else seeded_generator(req.seed, k, chat.model.device),
                )
                for k in range(req.n)
            ]
            results = await asyncio.wrap_future(batcher.submit(prompts, top_logprobs=0))
        prefix = chat.decode(ids) if req.echo else ""
        choices = []
        for k in range(req.n):
            r = results[k] if results else None
            text = "" if r is None else (r.text if r.text is not None else chat.decode(r.token_ids))
            choices.append(
                {
                    "index": k,
                    "text": prefix + text,
                    "logprobs": None,
                    "finish_reason": "length" if r is None or r.finish_reason == "length" else "stop",
                    "prompt_logprobs": scored,
                    "prompt_token_ids": ids,
                    "token_ids": [] if r is None else list(r.token_ids),
                }
            )
        n_out = sum(len(r.token_ids) for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": chat.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": n_out,
                "total_tokens": len(ids) + n_out,
            },
        }

    return app


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str = "cpu",
    media_root: str | None = None,
    model_name: str | None = None,
    window_ms: float = 10.0,
    max_batch_prompts: int = 64,
) -> None:
    """Load the checkpoint and serve it until interrupted (uvicorn, one process, one model)."""
    import uvicorn

    chat = ChatModel.from_checkpoint(checkpoint, device=device, media_root=media_root, name=model_name)
    app = create_app(chat, window_s=window_ms / 1000.0, max_batch_prompts=max_batch_prompts)
    uvicorn.run(app, host=host, port=port, log_level="warning")
