"""The text part of each benchmark's prompt, worded as the benchmark's own evaluation does it, so that the
answer parser (keye.eval.parsing) sees the format it asked for. Frames go in front, through the chat template.

Sources: Video-MME (lmms-eval / VLMEvalKit "Select the best answer ... Respond with only the letter"),
Video-MME-v2 README prompt (A..H), LongVideoBench dataloader ("Answer with the option's letter from the given
choices directly."), TimeLens grounder prompt ("The event happens in <start time> - <end time> seconds").
"""

from __future__ import annotations

from keye.eval.readers import LETTERS, Question


def _letters_list(n: int) -> str:
    letters = list(LETTERS[:n])
    return ", ".join(letters[:-1]) + ", or " + letters[-1]


def format_options(q: Question) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(q.options))


def subtitle_text(q: Question, max_chars: int = 4000) -> str:
    text = "\n".join(c.text for c in q.subtitles)
    return text[:max_chars]


def build_prompt(q: Question, with_subtitles: bool = True) -> str:
    """The user-turn text for one question (without the video frames)."""
    subs = subtitle_text(q) if with_subtitles else ""
    if q.kind == "timelens":
        return (
            f"Please find the visual event described by the sentence '{q.question}', determining its starting "
            "and ending times. The format should be: 'The event happens in <start time> - <end time> seconds'."
        )
    if q.kind == "longvideobench":
        head = f"Subtitles:\n{subs}\n" if subs else ""
        return (
            f"{head}Question: {q.question}\n{format_options(q)}\n"
            "Answer with the option's letter from the given choices directly."
        )
    head = "These are the frames of a video."
    if subs:
        head += f" This video's subtitles are listed below:\n{subs}"
    instruction = (
        "Select the best answer to the following multiple-choice question based on the video. "
        f"Respond with only the letter ({_letters_list(len(q.options))}) of the correct option."
    )
    if q.kind == "videomme_v2":
        return f"{head}\n{instruction}\nQuestion: {q.question}\n{format_options(q)}"
    return f"{head}\n{instruction}\n{q.question}\n{format_options(q)}\nThe best answer is:"
