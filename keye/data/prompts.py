"""The task prompts, in ONE place for training samples (keye.data.samples) and evaluation (keye.eval.prompts).

Why one place: a model answers the wording it was trained on. The multiple-choice and grounding prompts are the
benchmarks' own (the eval must ask as they do, so that keye.eval.parsing sees the format it asked for), and the
training samples use the very same functions, so the default pipeline's model is asked at eval time exactly what it
learned to answer. Frames go in front of this text through the chat template (keye.data.tokenizer.encode_chat).

Sources: Video-MME (lmms-eval / VLMEvalKit "Select the best answer ... Respond with only the letter"),
Video-MME-v2 README prompt (A..H), LongVideoBench dataloader ("Answer with the option's letter from the given
choices directly."), TimeLens grounder prompt ("The event happens in <start time> - <end time> seconds").
"""

from __future__ import annotations

from collections.abc import Sequence

from keye.core.hashing import stable_hash64
from keye.data.tokenizer import format_time

LETTERS = "ABCDEFGH"
SYSTEM_PROMPT = "You are Keye, a helpful assistant that understands videos."
CAPTION_PROMPT = "Describe the video."
DENSE_PROMPT = "List the events of the video, each with its start and end time in seconds."

# The multiple-choice wordings, by the benchmark kind whose evaluation uses them (keye.eval.readers kinds).
MCQ_STYLES: tuple[str, ...] = ("videomme", "videomme_v2", "longvideobench")
# What a training MCQ's answer is: the letter the benchmarks ask for, or the right option's own text.
MCQ_ANSWERS: tuple[str, ...] = ("letter", "option")


def letters_list(n: int) -> str:
    """'A, B, C, or D' for n = 4."""
    letters = list(LETTERS[:n])
    return ", ".join(letters[:-1]) + ", or " + letters[-1]


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def mcq_prompt(style: str, question: str, options: Sequence[str], subtitles: str = "") -> str:
    """A lettered multiple-choice question (2..8 options) worded as benchmark `style` asks it (MCQ_STYLES)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} options, got {len(options)}")
    if style == "longvideobench":
        head = f"Subtitles:\n{subtitles}\n" if subtitles else ""
        return (
            f"{head}Question: {question}\n{format_options(options)}\n"
            "Answer with the option's letter from the given choices directly."
        )
    if style not in MCQ_STYLES:
        raise ValueError(f"unknown multiple-choice style {style!r}; known: {MCQ_STYLES}")
    head = "These are the frames of a video."
    if subtitles:
        head += f" This video's subtitles are listed below:\n{subtitles}"
    instruction = (
        "Select the best answer to the following multiple-choice question based on the video. "
        f"Respond with only the letter ({letters_list(len(options))}) of the correct option."
    )
    if style == "videomme_v2":
        return f"{head}\n{instruction}\nQuestion: {question}\n{format_options(options)}"
    return f"{head}\n{instruction}\n{question}\n{format_options(options)}\nThe best answer is:"


def mcq_answer(options: Sequence[str], answer: int, kind: str = "letter") -> str:
    """The training answer of a multiple-choice question (MCQ_ANSWERS).

    Why "option": a model trained from scratch learns "which colour is the shape" from the frames within tens of
    steps when it answers with the word, but not with the letter, which also needs the binding of the word to its
    place in the option list (docs/TRAINING.md). keye.eval.parsing.parse_choice maps an answer that is exactly one
    option's text back to that option's letter, as VLMEvalKit's can_infer_text does, so such a model is scored on
    the same questions and letters as any other.
    """
    if kind == "letter":
        return LETTERS[answer]
    if kind == "option":
        return str(options[answer])
    raise ValueError(f"unknown multiple-choice answer kind {kind!r}; known: {MCQ_ANSWERS}")


def grounding_prompt(query: str) -> str:
    """The temporal-grounding question, as TimeLens asks it."""
    return (
        f"Please find the visual event described by the sentence '{query}', determining its starting "
        "and ending times. The format should be: 'The event happens in <start time> - <end time> seconds'."
    )


def grounding_answer(start: float, end: float) -> str:
    """The TimeLens answer form."""
    return f"The event happens in {format_time(start)} - {format_time(end)} seconds"


def pick_style(sample_key: str) -> str:
    """The multiple-choice style a training sample is worded in: a stable hash of its id (not Python's hash,
    which changes per process), so a sample reads the same in the pack stage, the loader and every rerun."""
    return MCQ_STYLES[stable_hash64(sample_key) % len(MCQ_STYLES)]
