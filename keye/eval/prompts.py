"""The text part of each benchmark's prompt for one Question, worded as the benchmark's own evaluation does it, so
that the answer parser (keye.eval.parsing) sees the format it asked for. Frames go in front, through the chat
template. The wordings themselves live in keye.data.prompts, which the training samples use too: the model is
asked at eval time what it was trained to answer.
"""

from __future__ import annotations

from keye.data.prompts import grounding_prompt, mcq_prompt
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
