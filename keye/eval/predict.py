"""A predict_fn for `keye.eval.evaluate` backed by a Keye checkpoint: frames planned by the shared sampling policy
(keye.data.sampling.plan_frames), the prompt rendered by the ONE chat template (keye.data.tokenizer.encode_chat,
a timestamp before every frame), greedy batched generation (keye.model.generate). Kept apart from the readers and
metrics so that scoring never imports torch."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from keye.data.prompts import SYSTEM_PROMPT
from keye.eval.prompts import build_prompt
from keye.eval.readers import Question
from keye.eval.runner import PredictFn


def keye_predict_fn(
    checkpoint_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    sampling_policy: Any = None,
    *,
    device: str = "cpu",
    dtype: Any = None,
    max_new_tokens: int = 32,
    with_subtitles: bool = True,
    system_prompt: str | None = SYSTEM_PROMPT,
    frames_cache: Any = None,
) -> PredictFn:
    """Load the checkpoint and tokenizer once; the returned function answers a batch of Questions (raw text).

    `tokenizer_dir` defaults to the checkpoint directory (a tokenizer.json saved beside the weights).
    `sampling_policy` is a keye.data.sampling.SamplingPolicy, a dict of its fields, or None for the defaults;
    it must be the policy the checkpoint was trained with for the frame sizes and token counts to match.
    `system_prompt` defaults to the one the training samples carry (keye.data.prompts); None or "" sends none.
    The user turn is the frames, then the question's text, exactly as in a training sample.
    `frames_cache` (a keye.data.frame_cache.FrameCache) keeps decoded frames for the next question of the same
    video, and across predictors that share it (an eval and the eval of the checkpoint it is compared with)."""
    import torch

    from keye.data.captioners.keye_checkpoint import frames_to_patches
    from keye.data.frame_cache import FrameCache
    from keye.data.sampling import SamplingPolicy, plan_frames
    from keye.data.tokenizer import encode_chat, load_tokenizer
    from keye.data.video import VideoRejected
    from keye.model import load_checkpoint
    from keye.model.generate import Prompt, generate

    saved_policy = Path(checkpoint_dir) / "sampling_policy.json"
    if sampling_policy is None and saved_policy.is_file():  # written beside the weights by the train stage
        policy = SamplingPolicy.model_validate_json(saved_policy.read_text())
    elif sampling_policy is None:
        policy = SamplingPolicy()
    elif isinstance(sampling_policy, Mapping):
        policy = SamplingPolicy(**sampling_policy)
    else:
        policy = sampling_policy
    model = load_checkpoint(checkpoint_dir, device=device, dtype=dtype)
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else checkpoint_dir
    tok = load_tokenizer(tokenizer_dir)
    if tok.vocab_size > model.config.lm.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_dir} has {tok.vocab_size} tokens but checkpoint {checkpoint_dir} only "
            f"{model.config.lm.vocab_size}: they were not trained together"
        )
    image_id = model.config.image_token_id
    patch = model.config.vision.patch_size
    eos = [tok.eos_id, tok.pad_id]

    cache = frames_cache if frames_cache is not None else FrameCache()

    def video_part(video: str | Path, blank_frames: bool) -> tuple[dict, Any, Any]:
        info = cache.probe(video)
        plan = plan_frames(info.duration, info.width, info.height, policy, video_fps=info.fps or None)
        frames = cache.frames(video, plan.timestamps, (plan.height, plan.width))
        if blank_frames:  # same sizes, times and tokens; no content (mid-grey is 0 after normalisation)
            frames = np.full_like(frames, 128)
        patches, grids = frames_to_patches(frames, patch)
        part = {
            "type": "video",
            "frames": [{"time": t, "tokens": plan.tokens_per_frame} for t in plan.timestamps],
        }
        return part, patches, grids

    def prompt_for(q: Question, blank_frames: bool) -> Any:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": q.video},
                    {"type": "text", "text": build_prompt(q, with_subtitles)},
                ],
            }
        )
        return chat_prompt(messages, blank_frames)

    def chat_prompt(messages: list[dict], blank_frames: bool = False) -> Any:
        """Messages whose content parts may be `{"type": "video", "video": path}`: the frames are sampled by the
        checkpoint's policy and the part becomes the frame placeholders (at most one video per chat)."""
        patches = grids = None
        rendered = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "video" and "video" in part:
                        if patches is not None:
                            raise ValueError("a chat may carry one video (its frames go to one visual run)")
                        part, patches, grids = video_part(part["video"], blank_frames)
                    parts.append(part)
                content = parts
            rendered.append({"role": msg["role"], "content": content})
        enc = encode_chat(tok, rendered, add_generation_prompt=True)
        ids = torch.from_numpy(enc.ids.copy())
        for start, length in enc.visual_runs:  # the model fills its own placeholder id with visual tokens
            ids[start : start + length] = image_id
        if patches is None:
            return Prompt(input_ids=ids)
        return Prompt(input_ids=ids, pixel_patches=patches.to(model.dtype), patch_grids=grids)

    def predict(questions: list[Question], blank_frames: bool = False) -> list[str]:
        """`blank_frames`: the control run, every frame mid-grey: what the model answers from the text alone."""
        answers = [""] * len(questions)
        prompts, index = [], []
        for i, q in enumerate(questions):
            try:
                prompts.append(prompt_for(q, blank_frames))
                index.append(i)
            except (
                VideoRejected
            ) as exc:  # one bad video costs its questions (answered "", so wrong), not the run
                warnings.warn(
                    f"question {q.id}: video {q.video} cannot be decoded ({exc.reason})", stacklevel=2
                )
        if prompts:
            results = generate(
                model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos
            )
            for i, r in zip(index, results, strict=True):
                answers[i] = tok.decode([t for t in r.token_ids if t not in eos])
        return answers

    def chat(conversations: list[list[dict]]) -> list[str]:
        """Answer chats (OpenAI-style messages; a content part `{"type": "video", "video": path}` brings frames)."""
        if not conversations:
            return []
        if system_prompt:  # as in training samples, unless the chat brings its own
            conversations = [
                m if m and m[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *m]
                for m in conversations
            ]
        results = generate(
            model,
            [chat_prompt(m) for m in conversations],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_token_ids=eos,
        )
        return [tok.decode([t for t in r.token_ids if t not in eos]) for r in results]

    predict.chat = chat  # type: ignore[attr-defined]  # same model and prompt code, for keye_chat_fn
    return predict


def keye_chat_fn(checkpoint_dir: str | Path, **kwargs: Any) -> Any:
    """`chat(list of message lists) -> list of answers` for a bundled checkpoint (tokenizer and sampling policy
    beside the weights): what the MLflow pyfunc model and other callers outside the benchmarks use."""
    return keye_predict_fn(checkpoint_dir, **kwargs).chat
