"""Training samples per task from shard records, with exact token counts (text + visual) for packing.

Why here: packing needs every sample's length before any frame is decoded, and the loader must later produce
exactly that many tokens. Both call `build_sample`, which renders the ONE chat template
(`keye.data.tokenizer.encode_chat`) over the frame plan (`keye.data.sampling.plan_frames`), whose per-frame token
count comes from `keye.model.vision_tokens` -- the same function the ViT/projector obey.

Task formats follow the Keye-VL / TimeLens conventions: frames interleaved with their text timestamps; temporal
grounding answers "The event happens in <start> - <end> seconds" (TimeLens); multiple choice answers one letter;
loss only on the assistant answer. Positions follow `keye.model.rope.mrope_positions` (Qwen2-VL M-RoPE rule), here
vectorised in numpy. SlowFast is not applied to packed samples: fast/slow needs decoded pixels, and counts must be
known before decoding (every frame is counted as slow).

Reading shard records (json only) is keye.data.shard_index; a whole PackSet from shards is keye.data.packset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from keye.core.hashing import stable_hash64
from keye.data.grounding_items import GroundingItem, frame_span, grounding_items, grounding_view
from keye.data.prompts import (
    CAPTION_PROMPT,
    DENSE_PROMPT,
    MCQ_ANSWERS,
    SYSTEM_PROMPT,
    grounding_answer,
    grounding_prompt,
    mcq_answer,
    mcq_prompt,
    pick_style,
)
from keye.data.sampling import FramePlan, SamplingPolicy, plan_frames
from keye.data.tokenizer import KeyeTokenizer, encode_chat, format_time
from keye.model.vision_tokens import MERGE, PATCH

# ---------------------------------------------------------------------------------------------------- samples
TASKS: tuple[str, ...] = ("caption", "dense", "grounding", "mcq", "text")
# An MCQ sample's item is `(turns - 1) * MCQ_TURNS_STRIDE + answer kind * MCQ_ANSWER_STRIDE + order *
# MCQ_ORDER_STRIDE + question index`: order 0 asks the options as annotated, order k > 0 in a permutation drawn from
# the sample's key (see mcq_options); answer kind indexes MCQ_ANSWERS (0: the letter, 1: the option's text); a
# sample of several turns asks that question and the next usable ones of the clip, one per turn, after one view of
# the frames. The item is the sample's identity in the pack index, so the loader rebuilds exactly the sample the
# pack stage counted.
MCQ_ORDER_STRIDE = 1000
MCQ_ANSWER_STRIDE = 10 * MCQ_ORDER_STRIDE
MCQ_TURNS_STRIDE = 10 * MCQ_ANSWER_STRIDE
MAX_MCQ_TURNS = 16


@dataclass(frozen=True)
class McqItem:
    """An MCQ sample's identity: its first question, the option order, how it is answered, how many turns.
    Stored as one integer (the `item` of the pack index, layout above), read and written only here."""

    question: int  # index into the record's mcq list
    order: int = 0  # 0: the annotated option order; k > 0: permutation k (mcq_options)
    answer: int = 0  # index into MCQ_ANSWERS (0: the letter, 1: the option's text)
    turns: int = 1  # questions of the clip asked in this sample, one per user turn

    def encode(self) -> int:
        return (
            (self.turns - 1) * MCQ_TURNS_STRIDE
            + self.answer * MCQ_ANSWER_STRIDE
            + self.order * MCQ_ORDER_STRIDE
            + self.question
        )

    @classmethod
    def decode(cls, item: int) -> McqItem:
        turns_less_one, rest = divmod(item, MCQ_TURNS_STRIDE)
        answer, asked = divmod(rest, MCQ_ANSWER_STRIDE)
        order, question = divmod(asked, MCQ_ORDER_STRIDE)
        return cls(question, order, answer, turns_less_one + 1)


def mcq_options(
    key: str, question: int, order: int, options: Sequence[str], answer: int
) -> tuple[list[str], int]:
    """The options of one MCQ sample and the index of the answer among them. Order 0 keeps the annotated order;
    order k > 0 is a permutation seeded by (key, question, k) through a stable hash. Why: one fixed order per
    question lets a small model learn which letters are usually right instead of reading the options; the same
    question asked in several orders has its answer under different letters."""
    opts = list(options)
    if order == 0:
        return opts, int(answer)
    perm = np.random.default_rng(stable_hash64(f"{key}:{question}:{order}")).permutation(len(opts))
    return [opts[i] for i in perm], int(np.flatnonzero(perm == int(answer))[0])


def span_text(start: float, end: float) -> str:
    return f"<|span_start|>{format_time(start)} - {format_time(end)} seconds<|span_end|>"


def select_frames(n: int, keep: int) -> list[int]:
    """Indices of `keep` of `n` frames, evenly spread, first frame included (how packing drops frames)."""
    if keep >= n:
        return list(range(n))
    if keep <= 0:
        return []
    return [int(math.floor(i * n / keep)) for i in range(keep)]


def frame_plan(record: dict[str, Any], policy: SamplingPolicy, keep_frames: int | None = None) -> FramePlan:
    """The frames of a shard record's clip (optionally cut to `keep_frames` evenly spread frames)."""
    plan = plan_frames(
        float(record["duration"]),
        int(record["width"]),
        int(record["height"]),
        policy,
        video_fps=record.get("fps"),
    )
    if keep_frames is None or keep_frames >= plan.n_frames:
        return plan
    idx = select_frames(plan.n_frames, keep_frames)
    ts = [plan.timestamps[i] for i in idx]
    return FramePlan(ts, plan.height, plan.width, plan.tokens_per_frame, len(ts) * plan.tokens_per_frame)


def usable_mcqs(record: dict[str, Any]) -> list[int]:
    """Indices of the record's MCQs a sample can ask (2..8 options, as the prompts letter them)."""
    return [i for i, q in enumerate(record.get("mcq") or []) if 2 <= len(q["options"]) <= 8]


def sample_items(
    record: dict[str, Any],
    tasks: Sequence[str] = TASKS,
    mcq_orders: int = 1,
    mcq_answer: str = "letter",
    mcq_turns: int = 1,
    grounding_answer: str = "exact",
    grounding_windows: int = 0,
) -> list[tuple[str, int]]:
    """(task, item) pairs a record yields; item indexes the task's list in the record (-1 for whole-clip tasks);
    each MCQ is asked in `mcq_orders` option orders and answered as `mcq_answer` (MCQ_ANSWERS), in samples of up
    to `mcq_turns` questions of the same clip (see the item layout at MCQ_ORDER_STRIDE); each grounding query on
    the whole clip and on up to `grounding_windows` windows of it, answered as `grounding_answer`
    (keye.data.grounding_items)."""
    if not 1 <= mcq_orders <= 8:
        raise ValueError(f"mcq_orders must be in 1..8, got {mcq_orders}")
    if mcq_answer not in MCQ_ANSWERS:
        raise ValueError(f"mcq_answer must be one of {MCQ_ANSWERS}, got {mcq_answer!r}")
    if not 1 <= mcq_turns <= MAX_MCQ_TURNS:
        raise ValueError(f"mcq_turns must be in 1..{MAX_MCQ_TURNS}, got {mcq_turns}")
    answer = MCQ_ANSWERS.index(mcq_answer)
    out: list[tuple[str, int]] = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
        if task == "caption" and (record.get("caption") or "").strip():
            out.append(("caption", -1))
        elif task == "dense" and record.get("dense_captions"):
            out.append(("dense", -1))
        elif task == "grounding":
            out.extend(("grounding", i) for i in grounding_items(record, grounding_answer, grounding_windows))
        elif task == "mcq":
            firsts = usable_mcqs(record)[::mcq_turns]
            items = [McqItem(i, k, answer, mcq_turns) for k in range(mcq_orders) for i in firsts]
            out.extend((task, it.encode()) for it in items)
        elif task == "text" and len(record.get("dense_captions") or []) >= 2 and record.get("grounding"):
            out.append(("text", 0))
    return out


def _video_part(plan: FramePlan) -> dict[str, Any]:
    return {
        "type": "video",
        "frames": [{"time": t, "tokens": plan.tokens_per_frame} for t in plan.timestamps],
    }


def task_messages(
    record: dict[str, Any], task: str, item: int, plan: FramePlan | None
) -> list[dict[str, Any]]:
    """The conversation of one sample (system, user with frames + question, assistant answer)."""
    video = [_video_part(plan)] if plan is not None and task != "text" else []
    if task == "caption":
        q, a = CAPTION_PROMPT, record["caption"].strip()
    elif task == "dense":
        q = DENSE_PROMPT
        a = "\n".join(f"{span_text(d['start'], d['end'])} {d['text']}" for d in record["dense_captions"])
    elif task == "grounding":
        it = GroundingItem.decode(item)
        g = record["grounding"][it.query]
        start, end = float(g["start"]), float(g["end"])
        if it.answer == 1 and plan is not None:  # "frames": the span the sampled frames bracket
            start, end = frame_span(start, end, plan.timestamps, float(record["duration"]))
        q, a = grounding_prompt(g["query"]), grounding_answer(start, end)
    elif task == "mcq":
        return _mcq_messages(record, item, video)
    elif (
        task == "text"
    ):  # grounding from a written event log: keeps language and time arithmetic without pixels
        log = "\n".join(f"{span_text(d['start'], d['end'])} {d['text']}" for d in record["dense_captions"])
        g = record["grounding"][item]
        q = f"Events of a video:\n{log}\n{grounding_prompt(g['query'])}"
        a = grounding_answer(g["start"], g["end"])
    else:
        raise ValueError(f"unknown task {task!r}")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [*video, {"type": "text", "text": q}]},
        {"role": "assistant", "content": a},
    ]


def _mcq_messages(record: dict[str, Any], item: int, video: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One MCQ sample: the frames, then each question of its group as a user turn with its answer.

    Why several turns: a question's answer is one or two tokens behind a few hundred of frames and prompt; asking
    a clip's questions in one conversation sees the frames once, so a step carries several times the answers (the
    first turn is exactly the single-question sample, and each question keeps its own wording and option order)."""
    key = str(record.get("key", ""))
    it = McqItem.decode(item)
    first = it.question
    usable = usable_mcqs(record)
    if first not in usable:
        raise ValueError(f"MCQ {first} of record {key!r} cannot be asked (needs 2..8 options)")
    at = usable.index(first)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for n, question in enumerate(usable[at : at + it.turns]):
        m = record["mcq"][question]
        options, answer = mcq_options(key, question, it.order, m["options"], m["answer"])
        style = pick_style(sample_id(key, "mcq", McqItem(question, it.order).encode()))
        text = {"type": "text", "text": mcq_prompt(style, m["question"], options)}
        messages.append({"role": "user", "content": [*video, text] if n == 0 else [text]})
        messages.append({"role": "assistant", "content": mcq_answer(options, answer, MCQ_ANSWERS[it.answer])})
    return messages


@dataclass
class BuiltSample:
    """One tokenised sample, ready to pack: ids, labels, positions, and the frames to decode."""

    sample_id: str
    task: str
    item: int
    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L] (-100 = no loss), aligned with input_ids
    timestamps: list[float]  # frames to decode (seconds from clip start)
    frame_size: tuple[int, int]  # (h, w) every frame is resized to; (0, 0) without frames
    visual_runs: list[tuple[int, int]]

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def frames(self) -> int:
        return len(self.timestamps)

    @property
    def visual_tokens(self) -> int:
        return int(sum(n for _, n in self.visual_runs))

    def patch_grid(self) -> tuple[int, int]:
        """ViT patch grid (rows, cols) of each frame."""
        return self.frame_size[0] // PATCH, self.frame_size[1] // PATCH

    def positions(self) -> np.ndarray:
        """M-RoPE position ids int64 [3, L], starting at 0 (see mrope_positions)."""
        gh, gw = self.patch_grid()
        return mrope_positions(self.tokens, self.visual_runs, (gh // MERGE, gw // MERGE))


def sample_id(key: str, task: str, item: int) -> str:
    return f"{key}:{task}:{item}"


def build_sample(
    tok: KeyeTokenizer,
    record: dict[str, Any],
    task: str,
    item: int,
    policy: SamplingPolicy,
    keep_frames: int | None = None,
) -> BuiltSample:
    """Tokenise one (record, task, item); `keep_frames` cuts the frame plan as the pack stage decided."""
    key = record["key"]
    offset = 0.0
    if task == "grounding":  # a window of the clip: its own frame plan, stamped from the window's start
        record, offset = grounding_view(record, item)
    plan = None if task == "text" else frame_plan(record, policy, keep_frames)
    enc = encode_chat(tok, task_messages(record, task, item, plan))
    image_id = tok.image_id
    for start, n in enc.visual_runs:
        if not (enc.ids[start : start + n] == image_id).all():
            raise AssertionError("visual run is not placeholder tokens")  # template invariant
    return BuiltSample(
        sample_id=sample_id(key, task, item),
        task=task,
        item=item,
        input_ids=enc.ids,
        labels=enc.labels,
        timestamps=[offset + t for t in plan.timestamps] if plan is not None else [],
        frame_size=(plan.height, plan.width) if plan is not None else (0, 0),
        visual_runs=enc.visual_runs,
    )


def mrope_positions(
    length: int, visual_runs: Sequence[tuple[int, int]], merged_grid: tuple[int, int]
) -> np.ndarray:
    """Qwen2-VL M-RoPE positions of one sample: text t=h=w=p (p advancing by 1); a frame run of gh*gw tokens in
    raster order gets t=p, h=p+row, w=p+col, then text resumes at p+max(gh, gw). Same rule as
    keye.model.rope.mrope_positions (tested equal)."""
    gh, gw = merged_grid
    step = np.ones(length, dtype=np.int64)  # how much p advances after each token (text: 1)
    is_vis = np.zeros(length, dtype=bool)
    for start, n in visual_runs:
        if n != gh * gw:
            raise ValueError(f"visual run of {n} tokens does not match merged grid {gh}x{gw}")
        is_vis[start : start + n] = True
        step[start : start + n] = 0
        step[start + n - 1] = max(gh, gw)
    base = np.concatenate([[0], np.cumsum(step)[:-1]])  # p before each token
    pos = np.repeat(base[None], 3, axis=0)
    if visual_runs:
        rows = np.repeat(np.arange(gh), gw)
        cols = np.tile(np.arange(gw), gh)
        for start, n in visual_runs:
            pos[1, start : start + n] += rows
            pos[2, start : start + n] += cols
    return pos


# Sample-table columns (the pack stage's input; keye.data.packing.pack reads tokens/visual_tokens/frames).
SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("task", pa.string()),
        ("item", pa.int32()),
        ("tokens", pa.int64()),
        ("visual_tokens", pa.int64()),
        ("frames", pa.int64()),
        ("text_tokens", pa.int64()),
    ]
)


def sample_table(
    records: Iterable[tuple[str, dict[str, Any]]],
    tok: KeyeTokenizer,
    policy: SamplingPolicy,
    tasks: Sequence[str] = TASKS,
    split: str | None = "train",
    bad: list[tuple[str, str, str]] | None = None,
    mcq_orders: int = 1,
    mcq_answer: str = "letter",
    mcq_turns: int = 1,
    grounding_answer: str = "exact",
    grounding_windows: int = 0,
) -> pa.Table:
    """One row per (record, task, item) with exact token counts. `records` yields (shard name, record json);
    records of another split are skipped (None = keep all). With a `bad` list, a record that cannot be built
    (e.g. a frame size the plan rejects) is appended there as (shard, key, reason) and skipped; else it raises.
    `mcq_orders`, `mcq_answer`, `mcq_turns`, `grounding_answer`, `grounding_windows`: how MCQs and grounding
    queries are asked and answered (sample_items)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in SAMPLE_SCHEMA}
    for shard, rec in records:
        if split is not None and rec.get("split", "train") != split:
            continue
        try:
            built = [
                build_sample(tok, rec, task, item, policy)
                for task, item in sample_items(
                    rec, tasks, mcq_orders, mcq_answer, mcq_turns, grounding_answer, grounding_windows
                )
            ]
        except (KeyError, ValueError, TypeError, IndexError) as e:
            if bad is None:
                raise
            bad.append((shard, str(rec.get("key", "")), f"cannot build samples: {type(e).__name__}: {e}"))
            continue
        for s in built:
            task, item = s.task, s.item
            cols["sample_id"].append(s.sample_id)
            cols["shard"].append(shard)
            cols["key"].append(rec["key"])
            cols["task"].append(task)
            cols["item"].append(item)
            cols["tokens"].append(s.tokens)
            cols["visual_tokens"].append(s.visual_tokens)
            cols["frames"].append(s.frames)
            cols["text_tokens"].append(s.tokens - s.visual_tokens)
    return pa.table(cols, schema=SAMPLE_SCHEMA)


def corpus_texts(records: Iterable[dict[str, Any]]) -> Iterable[str]:
    """Every text the samples can contain, with the prompts: the corpus the default BPE is trained on."""
    yield SYSTEM_PROMPT
    yield CAPTION_PROMPT
    yield DENSE_PROMPT
    for rec in records:
        for task, item in sample_items(rec):
            for msg in task_messages(rec, task, item, None):
                c = msg["content"]
                yield c if isinstance(c, str) else "\n".join(p["text"] for p in c if p["type"] == "text")
    for t in range(0, 1000):
        yield f"{format_time(t / 2)} seconds"


def recounter(
    table: pa.Table,
    records: dict[tuple[str, str], dict[str, Any]],
    tok: KeyeTokenizer,
    policy: SamplingPolicy,
) -> Any:
    """A `recount(row, kept_frames)` for keye.data.packing.pack: exact counts of a sample cut to fewer frames.
    `records` maps (shard, key) -> record json."""
    shard, key = table.column("shard").to_pylist(), table.column("key").to_pylist()
    task, item = table.column("task").to_pylist(), table.column("item").to_pylist()

    def recount(row: int, kept_frames: int) -> tuple[int, int]:
        s = build_sample(tok, records[(shard[row], key[row])], task[row], int(item[row]), policy, kept_frames)
        return s.tokens, s.visual_tokens

    return recount
