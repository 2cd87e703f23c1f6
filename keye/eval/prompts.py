"""The text part of each benchmark's prompt for one Question, worded as the benchmark's own evaluation does it, so
that the answer parser (keye.eval.parsing) sees the format it asked for. Frames go in front, through the chat
template. The wordings themselves live in keye.data.prompts, which the training samples use too: the model is
asked at eval time what it was trained to answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keye.data.prompts import SYSTEM_PROMPT, grounding_prompt, mcq_prompt
from keye.eval.readers import Question


def subtitle_text(q: Question, max_chars: int = 4000) -> str:
    text = "\n".join(c.text for c in q.subtitles)
    return text[:max_chars]


def build_prompt(q: Question, with_subtitles: bool = True) -> str:
    """The user-turn text for one question (without the video frames)."""
    if q.kind == "timelens":
        return grounding_prompt(q.question)
    subs = subtitle_text(q) if with_subtitles else ""
    style = q.kind if q.kind in ("longvideobench", "videomme_v2") else "videomme"
    return mcq_prompt(style, q.question, q.options, subs)


def video_messages(
    video: str | Path, text: str, system_prompt: str | None = SYSTEM_PROMPT
) -> list[dict[str, Any]]:
    """The chat keye.eval.predict builds (system prompt, the whole video's frames, then the text), as OpenAI
    messages with the video as a local path: a server or keye.serve.chat.ChatModel plans the frames with the
    checkpoint's own policy."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    video_part = {"type": "video_url", "video_url": {"url": str(Path(video).resolve())}}
    messages.append({"role": "user", "content": [video_part, {"type": "text", "text": text}]})
    return messages


def question_messages(
    q: Question, system_prompt: str | None = SYSTEM_PROMPT, with_subtitles: bool = True
) -> list[dict[str, Any]]:
    """One question as the evaluation asks it, in the OpenAI chat format."""
    return video_messages(q.video, build_prompt(q, with_subtitles), system_prompt)
