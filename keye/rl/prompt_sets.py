"""RL prompt sets from the sidecar annotations of a split: the same benchmark files and prompt wordings as the
evaluation (keye.eval.export, keye.data.prompts), so the policy is trained on exactly the question form it is
scored on, only on other videos. Each prompt carries the reference its reward needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keye.data.prompts import SYSTEM_PROMPT
from keye.eval.export import write_heldout_benchmarks
from keye.eval.prompts import question_messages
from keye.eval.readers import Question, read_benchmark
from keye.rl.rollouts import RolloutPrompt

TASK_KINDS = ("timelens", "videomme", "videomme_v2", "longvideobench")


def question_reference(q: Question) -> dict[str, Any]:
    """What the rewards of keye.rl.rewards read: a span and the duration (grounding), or the answer letter and
    the options (multiple choice); `kind` lets a per-task reward pick its function."""
    if q.is_grounding:
        if not q.spans or q.duration is None:
            raise ValueError(f"grounding question {q.id} of {q.video} has no span or duration")
        return {"kind": q.kind, "span": list(q.spans[0]), "duration": float(q.duration)}
    return {"kind": q.kind, "answer": q.answer, "options": list(q.options), "n_options": len(q.options)}


def question_prompt(q: Question, system_prompt: str | None = SYSTEM_PROMPT) -> RolloutPrompt:
    """A benchmark question asked as the evaluation asks it, with the reference its reward reads."""
    return RolloutPrompt(question_messages(q, system_prompt), question_reference(q), f"{q.kind}/{q.id}")


def window_prompts(
    q: Question, windows: int, system_prompt: str | None = SYSTEM_PROMPT
) -> list[RolloutPrompt]:
    """A grounding question asked again on up to `windows` windows of its video (keye.data.grounding_items: the
    same stable-hash windows, >= 3 s, holding part of the event), each shown as a clip of its own (frames stamped
    from 0) with the span shifted and clipped into it, as the SFT curriculum asks them. Why: RL on the few
    training clips alone raises their reward without moving held-out queries (bench/RESULTS.md `## video_rl
    sweep`); a window is a new frame set and a new answer, so the reward has to be read from the frames."""
    from keye.data.grounding_items import grounding_window
    from keye.data.video import probe

    if not q.is_grounding or windows <= 0:
        return []
    start, end = q.spans[0]
    record = {
        "key": f"{q.video.name}#{q.id}",
        "duration": float(q.duration),
        "fps": probe(q.video, min_duration=0.0).fps,  # windows snap to whole video frames
        "grounding": [{"start": start, "end": end}],
    }
    out = []
    for k in range(1, windows + 1):
        w = grounding_window(record, 0, k)
        if w is None:
            continue
        a, length = w
        messages = question_messages(q, system_prompt)
        video = next(p for p in messages[-1]["content"] if p.get("type") == "video_url")
        video["video_url"].update(start=a, end=a + length, timestamps="relative")
        span = [round(max(start, a) - a, 3), round(min(end, a + length) - a, 3)]
        reference = {"kind": q.kind, "span": span, "duration": float(length)}
        out.append(RolloutPrompt(messages, reference, f"{q.kind}/{q.id}@w{k}"))
    return out


def split_prompts(
    video_paths: Sequence[str | Path],
    work_dir: Path,
    split: str = "train",
    kinds: Sequence[str] = ("timelens",),
    system_prompt: str | None = SYSTEM_PROMPT,
    grounding_windows: int = 0,
) -> list[RolloutPrompt]:
    """Prompts for every question of `kinds` over the videos whose sidecar annotation (`<stem>.json`) is in
    `split`; benchmark files are written under work_dir. Order: by video folder, kind, then the file's order, each
    grounding question followed by its `grounding_windows` window prompts (window_prompts)."""
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown:
        raise ValueError(f"unknown RL task kind(s) {unknown}; known: {list(TASK_KINDS)}")
    by_dir: dict[Path, list[Path]] = {}
    for v in video_paths:
        ann = Path(v).with_suffix(".json")
        if ann.is_file():
            by_dir.setdefault(Path(v).parent, []).append(ann)
    prompts: list[RolloutPrompt] = []
    for i, (videos_dir, anns) in enumerate(sorted(by_dir.items())):
        files = write_heldout_benchmarks(anns, videos_dir, Path(work_dir) / f"set{i}", split=split)
        for kind in kinds:
            if kind in files:
                bench = read_benchmark(files[kind], videos_dir, kind=kind)
                for q in bench.questions:
                    prompts.append(question_prompt(q, system_prompt))
                    prompts += window_prompts(q, grounding_windows, system_prompt)
    if not prompts:
        raise ValueError(
            f"no {list(kinds)} questions in the {split!r} split of {len(video_paths)} videos: the RL stage needs "
            "annotated videos (sidecar <stem>.json with grounding / mcq entries) in that split"
        )
    return prompts
