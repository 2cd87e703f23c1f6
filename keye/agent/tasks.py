"""Agent tasks with verifiable rewards, derived from the synthetic set's sidecar annotations (schema
keye.annotations/v1) without touching the videos or the held-out benchmark files: new task files beside them.

Three kinds, each built so that its tool is what answers it well:
  frames   a multiple-choice question about an object whose whole life falls between the frames of the first,
           low-fps view (the same frame sampler as training plans that view), so only looking again shows it; and
           "when does <event> happen?" for events the first view only brackets between two frames (the answer
           within 0.25 s needs a closer look at a higher rate)
  search   a question answered by the dense captions (the "transcript"); the opening has no video at all, so
           the answer must come from the `search` tool over the corpus of that video
  python   arithmetic over the listed visible spans (total time with at least one object visible: a union of
           intervals; with one object, the percentage of the video it is visible in), which a cell computes exactly
The reward `agent_task` checks each kind: the option letter (mcq), a span with IoU >= 0.5, a number within 0.05.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keye.agent.env import AgentTask
from keye.agent.search import Document
from keye.data.sampling import SamplingPolicy, plan_frames
from keye.eval.parsing import parse_span
from keye.rl.rewards import mcq_exact, register_reward, temporal_iou

TASK_SCHEMA = "keye.agent_tasks/v1"
LETTERS = "ABCDEFGH"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_view_times(
    duration: float,
    width: int,
    height: int,
    policy: SamplingPolicy,
    fps: float,
    video_fps: float | None = None,
) -> list[float]:
    """The times the opening low-fps view shows (keye.data.sampling.plan_frames at `fps`, exactly as
    keye.serve.chat plans a video_url part with that fps)."""
    plan = plan_frames(duration, width, height, policy.model_copy(update={"fps": fps}), video_fps=video_fps)
    return plan.timestamps


def _lives(ann: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each object's colour at appearance, shape and visible span, from the generator's events."""
    objs: dict[int, dict[str, Any]] = {}
    for e in ann.get("events", []):
        if e.get("type") == "appear":
            objs[e["object"]] = {
                "color": e["color"],
                "shape": e["shape"],
                "start": e["t"],
                "end": ann["duration"],
            }
        elif e.get("type") == "disappear" and e.get("object") in objs:
            objs[e["object"]]["end"] = e["t"]
    return [objs[k] for k in sorted(objs)]


def _options(answer: str, seed: int) -> tuple[list[str], str]:
    """Four colour options (the answer included) in an order fixed by `seed`; the answer's letter."""
    others = [c for c in COLOURS if c != answer]
    k = seed % len(others)
    pool = (others[k:] + others[:k])[:3]
    pos = seed % 4
    opts = pool[:pos] + [answer] + pool[pos:]
    return opts, LETTERS[pos]


def frames_tasks(
    ann: Mapping[str, Any],
    video: str,
    size: tuple[int, int],
    policy: SamplingPolicy,
    first_fps: float = 0.5,
    video_fps: float | None = None,
    duration: float | None = None,
) -> list[AgentTask]:
    """Colour questions about objects that no frame of the first view shows (`size` = displayed (width, height),
    `video_fps` the stream's rate, both as keye.data.video.probe reports them)."""
    shown = first_view_times(
        float(duration or ann["duration"]), size[0], size[1], policy, first_fps, video_fps
    )
    out = []
    for i, life in enumerate(_lives(ann)):
        if any(life["start"] <= t <= life["end"] for t in shown):
            continue
        opts, letter = _options(life["color"], len(out) + i + int(life["start"] * 100))
        listed = " ".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(opts))
        question = (
            f"A {life['shape']} appears briefly at {life['start']:.1f} seconds. What colour is it when it appears? "
            f"{listed}. Answer with the option letter."
        )
        video_part = {"type": "video_url", "video_url": {"url": video, "fps": first_fps}}
        out.append(
            AgentTask(
                id=f"{Path(ann['video']).stem}:frames:{i}",
                messages=[{"role": "user", "content": [video_part, {"type": "text", "text": question}]}],
                reference={"type": "mcq", "answer": letter, "options": opts},
                video=video,
                video_id=str(ann["video"]),
                kind="frames",
            )
        )
    return out


_MOMENT = {
    "appear": "does the {name} appear",
    "disappear": "does the {name} disappear",
    "grows": "does the {name} start to grow",
    "shrinks": "does the {name} start to shrink",
    "color_change": "does the {name} change colour",
    "scene_cut": "does the background change",
}


def moment_tasks(
    ann: Mapping[str, Any],
    video: str,
    size: tuple[int, int],
    policy: SamplingPolicy,
    first_fps: float = 0.5,
    video_fps: float | None = None,
    duration: float | None = None,
    tolerance: float = 0.25,
    look_frames: int = 10,
) -> list[AgentTask]:
    """'When does <event> happen?' for events no frame of the first view comes within 2 x tolerance of: the first
    view only brackets the moment between two frames; a closer look at a higher rate pins it (answer in seconds,
    within `tolerance`). Only moments one look of `look_frames` frames can pin: a bracket wider than
    look_frames x tolerance (a long video's opening frames 75 s apart) would need looks no answer is read from."""
    shown = first_view_times(
        float(duration or ann["duration"]), size[0], size[1], policy, first_fps, video_fps
    )
    names = {
        e["object"]: f"{e['color']} {e['shape']}" for e in ann.get("events", []) if e.get("type") == "appear"
    }
    out = []
    for i, e in enumerate(ann.get("events", [])):
        what = _MOMENT.get(e.get("type", ""))
        if what is None or e["t"] < 2 * tolerance or any(abs(e["t"] - t) < 2 * tolerance for t in shown):
            continue
        phrase = what.format(name=names.get(e.get("object"), "shape"))
        # the two opening frames around the moment: where an agent that read the first view looks again
        before = max((t for t in shown if t < e["t"]), default=0.0)
        after = min((t for t in shown if t > e["t"]), default=float(duration or ann["duration"]))
        if after - before > look_frames * tolerance:
            continue
        question = f"When {phrase}? Answer with the time in seconds, to one decimal."
        video_part = {"type": "video_url", "video_url": {"url": video, "fps": first_fps}}
        out.append(
            AgentTask(
                id=f"{Path(ann['video']).stem}:moment:{i}",
                messages=[{"role": "user", "content": [video_part, {"type": "text", "text": question}]}],
                reference={
                    "type": "number",
                    "value": round(float(e["t"]), 3),
                    "tolerance": tolerance,
                    "bracket": [round(before, 3), round(after, 3)],
                },
                video=video,
                video_id=str(ann["video"]),
                kind="frames",
            )
        )
    return out


def search_tasks(ann: Mapping[str, Any]) -> list[AgentTask]:
    """'When does <the object> disappear?' answered from the dense captions only (no video in the opening)."""
    out = []
    for i, d in enumerate(ann.get("dense_captions", [])):
        if not d["text"].endswith("disappears"):
            continue
        subject = d["text"][: -len(" disappears")]
        question = (
            f"In the video {ann['video']}, during which time span does {subject} disappear? Search its "
            "transcript. Answer as 'start - end seconds'."
        )
        out.append(
            AgentTask(
                id=f"{Path(ann['video']).stem}:search:{i}",
                messages=[{"role": "user", "content": question}],
                reference={"type": "span", "span": [d["start"], d["end"]], "duration": ann["duration"]},
                video_id=str(ann["video"]),
                kind="search",
            )
        )
    return out


def _union_length(spans: Sequence[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def python_tasks(ann: Mapping[str, Any]) -> list[AgentTask]:
    """Total time with at least one object visible, from the listed spans (videos with 2+ objects)."""
    spans = [(g["start"], g["end"]) for g in ann.get("grounding", []) if g["query"].endswith(" is visible")]
    if len(spans) == 1:  # one object: the share of the video it is visible in
        (a, b), dur = spans[0], float(ann["duration"])
        question = (
            f"The video lasts {dur:.2f} seconds and an object is visible from {a:.2f} to {b:.2f} seconds. What "
            "percentage of the video shows it? Answer with the percentage to one decimal."
        )
        return [
            AgentTask(
                id=f"{Path(ann['video']).stem}:python:0",
                messages=[{"role": "user", "content": question}],
                reference={"type": "number", "value": round(100 * (b - a) / dur, 1), "tolerance": 0.15},
                video_id=str(ann["video"]),
                kind="python",
            )
        ]
    if len(spans) < 2:
        return []
    listed = "; ".join(f"{s:.2f} - {e:.2f} s" for s, e in spans)
    question = (
        f"Objects are visible during these spans: {listed}. For how many seconds in total is at least one object "
        "visible? Answer with the number of seconds to two decimals."
    )
    return [
        AgentTask(
            id=f"{Path(ann['video']).stem}:python:0",
            messages=[{"role": "user", "content": question}],
            reference={"type": "number", "value": round(_union_length(spans), 2), "tolerance": 0.05},
            video_id=str(ann["video"]),
            kind="python",
        )
    ]


def corpus(annotations: Iterable[Mapping[str, Any]]) -> list[Document]:
    """The search corpus: each video's caption and dense captions, keyed by the video's file name."""
    docs = []
    for ann in annotations:
        v = str(ann["video"])
        docs.append(Document(f"{v}:caption", ann.get("caption", ""), "caption", v))
        for i, d in enumerate(ann.get("dense_captions", [])):
            docs.append(Document(f"{v}:dense:{i}", d["text"], "dense_caption", v, d["start"], d["end"]))
    return docs


def derive_tasks(
    videos: str | Path | Sequence[str | Path],
    policy: SamplingPolicy,
    first_fps: float = 0.5,
    split: str | None = None,
    look_frames: int = 10,
    kinds: Sequence[str] | None = None,
) -> list[AgentTask]:
    """Every task of the annotated videos (a directory, or video paths whose `<stem>.json` sidecars are read),
    optionally of one split; read-only on the files. `look_frames`: the frames one `frames` call returns.
    `kinds`: only the tasks meant for these tools (a run that offers a subset neither trains nor scores the rest)."""
    from keye.data.video import probe

    if isinstance(videos, (str, Path)):
        sides = sorted(Path(videos).glob("*.json"))
    else:
        sides = sorted(
            {Path(v).with_suffix(".json") for v in videos if Path(v).with_suffix(".json").is_file()}
        )
    out = []
    for side in sides:
        ann = json.loads(side.read_text(encoding="utf-8"))
        if ann.get("schema") != "keye.annotations/v1" or (split is not None and ann.get("split") != split):
            continue
        video = side.with_name(ann["video"])
        info = probe(video, min_duration=0.0)
        size = (info.width, info.height)
        out += frames_tasks(ann, str(video), size, policy, first_fps, info.fps or None, info.duration)
        out += moment_tasks(
            ann, str(video), size, policy, first_fps, info.fps or None, info.duration, look_frames=look_frames
        )
        out += search_tasks(ann) + python_tasks(ann)
    return out if kinds is None else [t for t in out if t.kind in kinds]


def annotations_of(videos: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The sidecar annotations of the given videos (those that have one)."""
    sides = sorted({Path(v).with_suffix(".json") for v in videos if Path(v).with_suffix(".json").is_file()})
    anns = [json.loads(p.read_text(encoding="utf-8")) for p in sides]
    return [a for a in anns if a.get("schema") == "keye.annotations/v1"]


# ------------------------------------------------------------------------------------------------ files
def task_to_json(t: AgentTask) -> dict[str, Any]:
    return {"schema": TASK_SCHEMA, "id": t.id, "kind": t.kind, "messages": t.messages, "reference": t.reference,
            "video": t.video, "video_id": t.video_id}  # fmt: skip


def write_tasks(path: str | Path, tasks: Sequence[AgentTask]) -> Path:
    """JSON lines, written atomically."""
    from keye.core.atomic import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(task_to_json(t), sort_keys=True) + "\n" for t in tasks))


def read_tasks(path: str | Path) -> list[AgentTask]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if d.get("schema") != TASK_SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r} is not {TASK_SCHEMA}")
            out.append(
                AgentTask(
                    d["id"], d["messages"], d["reference"], d.get("video"), d.get("video_id"), d["kind"]
                )
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{path}:{n}: not an agent task ({e}); regenerate the file with derive_tasks"
            ) from e
    return out


# ------------------------------------------------------------------------------------------------ reward
def _final_answer(text: str) -> str:
    """The text after the last tool response / inside <answer> when present."""
    m = re.findall(r"<answer>(.*?)</answer>", text or "", re.S)
    return m[-1] if m else (text or "")


@register_reward("agent_task")
def agent_task_reward(completion: str, reference: Mapping[str, Any]) -> float:
    """1 for a right answer of the task's kind (mcq letter; span with IoU >= 0.5; number within tolerance)."""
    answer = _final_answer(completion)
    kind = reference.get("type")
    if kind == "mcq":
        return mcq_exact(answer, reference)
    if kind == "span":
        try:
            span = parse_span(answer)
        except (ValueError, OverflowError):
            return 0.0
        return 1.0 if span is not None and temporal_iou(span, tuple(reference["span"])) >= 0.5 else 0.0
    if kind == "number":
        nums = _NUMBER.findall(answer)
        if not nums:
            return 0.0
        return (
            1.0
            if abs(float(nums[-1]) - float(reference["value"])) <= float(reference.get("tolerance", 0))
            else 0.0
        )
    return 0.0
