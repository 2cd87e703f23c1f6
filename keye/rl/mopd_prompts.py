"""MOPD prompt sets: the RL prompts of a split (grounding queries and MCQs asked as the evaluation asks them) tagged
with their domain, plus captioning prompts, each carrying the clip's transcript for a text teacher.

Domains route prompts to teachers (keye.rl.teachers.TeacherRouter): a question's benchmark kind gives its domain
(`DOMAIN_OF_KIND`); the transcript is built from the video's sidecar annotation `<stem>.json` (caption and dense
captions, keye.rl.teachers.transcript_text) or given by the caller (e.g. from a CaptionSet's records).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keye.data.prompts import CAPTION_PROMPT, SYSTEM_PROMPT
from keye.eval.prompts import video_messages
from keye.rl.prompt_sets import split_prompts
from keye.rl.rollouts import RolloutPrompt
from keye.rl.teachers import transcript_text

DOMAIN_OF_KIND = {
    "timelens": "grounding",
    "videomme": "mcq",
    "videomme_v2": "mcq",
    "longvideobench": "mcq",
    "caption": "caption",
}


def sidecar_transcript(video: str | Path) -> str:
    """The transcript of a video from its sidecar `<stem>.json` (fields caption, dense_captions)."""
    ann_path = Path(video).with_suffix(".json")
    if not ann_path.is_file():
        raise FileNotFoundError(
            f"{ann_path}: no sidecar annotation for {video} (a text teacher needs its captions)"
        )
    ann = json.loads(ann_path.read_text(encoding="utf-8"))
    try:
        return transcript_text(ann.get("caption"), ann.get("dense_captions") or [])
    except ValueError as e:
        raise ValueError(f"{ann_path}: {e}") from e


def _video_of(prompt: RolloutPrompt) -> str | None:
    for m in prompt.messages:
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                if part.get("type") == "video_url":
                    return str(part["video_url"]["url"])
    return None


def tag_domains(
    prompts: Sequence[RolloutPrompt],
    domain_of_kind: Mapping[str, str] = DOMAIN_OF_KIND,
    transcript_of: Callable[[str], str] | None = sidecar_transcript,
) -> list[RolloutPrompt]:
    """Copies of `prompts` with reference["domain"] from reference["kind"] and, when `transcript_of` is given,
    reference["transcript"] of the prompt's video. A kind without a domain is an error naming it."""
    out = []
    for p in prompts:
        kind = p.reference.get("kind")
        if kind not in domain_of_kind:
            raise KeyError(
                f"prompt {p.id or '?'}: task kind {kind!r} has no MOPD domain; known kinds: {sorted(domain_of_kind)}"
            )
        ref: dict[str, Any] = {**p.reference, "domain": domain_of_kind[kind]}
        video = _video_of(p)
        if transcript_of is not None and video is not None and "transcript" not in ref:
            ref["transcript"] = transcript_of(video)
        out.append(RolloutPrompt(list(p.messages), ref, p.id))
    return out


def _annotations(video_paths: Sequence[str | Path], split: str) -> dict[Path, list[Path]]:
    by_dir: dict[Path, list[Path]] = {}
    for v in video_paths:
        ann = Path(v).with_suffix(".json")
        if ann.is_file() and json.loads(ann.read_text(encoding="utf-8")).get("split") == split:
            by_dir.setdefault(Path(v).parent, []).append(ann)
    return by_dir


def domain_prompts(
    video_paths: Sequence[str | Path],
    work_dir: Path,
    split: str = "train",
    kinds: Sequence[str] = ("timelens", "videomme"),
    captions: bool = True,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> list[RolloutPrompt]:
    """Domain-tagged prompts of the `split` videos: every question of `kinds` (keye.rl.prompt_sets: asked as the
    evaluation asks them) and, with `captions`, one "Describe the video." per video whose annotation has a caption
    (reference: the caption). Each carries its video's transcript."""
    prompts: list[RolloutPrompt] = []
    if kinds:
        try:
            prompts += split_prompts(video_paths, work_dir, split, kinds, system_prompt)
        except ValueError:
            if not captions:
                raise
    if captions:
        for videos_dir, anns in sorted(_annotations(video_paths, split).items()):
            for ann_path in sorted(anns):
                ann = json.loads(ann_path.read_text(encoding="utf-8"))
                if ann.get("caption"):
                    msgs = video_messages(videos_dir / ann["video"], CAPTION_PROMPT, system_prompt)
                    ref = {"kind": "caption", "caption": str(ann["caption"])}
                    prompts.append(RolloutPrompt(msgs, ref, f"caption/{Path(ann['video']).stem}"))
    if not prompts:
        raise ValueError(
            f"no {list(kinds)} questions or captions in the {split!r} split of {len(video_paths)} videos: MOPD "
            "needs annotated videos (sidecar <stem>.json) in that split"
        )
    return tag_domains(prompts)
