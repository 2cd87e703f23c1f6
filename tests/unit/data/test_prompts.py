"""One wording for training and evaluation: the MCQ / grounding prompts of the training samples are the benchmark
prompts the eval asks (keye.data.prompts), in the same chat layout, with the same system prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from keye.data.prompts import MCQ_STYLES, SYSTEM_PROMPT, grounding_prompt, mcq_prompt, pick_style
from keye.data.samples import (
    MCQ_ANSWER_STRIDE,
    MCQ_ORDER_STRIDE,
    MCQ_TURNS_STRIDE,
    build_sample,
    corpus_texts,
    sample_id,
    sample_items,
)
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.eval.prompts import build_prompt
from keye.eval.readers import Question

POLICY = SamplingPolicy(min_frames=2, max_frames=4, min_tokens_per_frame=4, max_tokens_per_frame=4)
OPTIONS = ["red", "blue", "green", "yellow"]


def _rec(n_mcq: int = 6) -> dict:
    return {
        "key": "c0000000000000abc",
        "duration": 4.0,
        "fps": 8.0,
        "width": 128,
        "height": 96,
        "caption": "A red circle appears.",
        "dense_captions": [{"start": 0.5, "end": 2.0, "text": "a red circle appears"}],
        "grounding": [{"query": "a red circle is visible", "start": 0.5, "end": 3.0}],
        "mcq": [
            {"question": f"What colour is shape {i}?", "options": OPTIONS, "answer": i % 4}
            for i in range(n_mcq)
        ],
    }


@pytest.fixture(scope="module")
def tok():
    return train_bpe(corpus_texts([_rec()]), vocab_size=800)


def _user_text(tok, sample) -> str:
    """The text of the user turn after the last frame."""
    full = tok.decode(sample.input_ids.tolist(), skip_special_tokens=False)
    user = full.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return user.rsplit("<|frame_end|>", 1)[-1]


def test_styles_are_the_eval_wordings() -> None:
    q = Question(id="x", kind="videomme", video=Path("v.mp4"), question="What colour?", options=OPTIONS)
    assert build_prompt(q) == mcq_prompt("videomme", "What colour?", OPTIONS)
    assert build_prompt(q).endswith("D. yellow\nThe best answer is:")
    assert "(A, B, C, or D)" in build_prompt(q)
    v2 = Question(
        id="y", kind="videomme_v2", video=Path("v.mp4"), question="Which?", options=list("abcdefgh")
    )
    assert build_prompt(v2) == mcq_prompt("videomme_v2", "Which?", list("abcdefgh"))
    assert "(A, B, C, D, E, F, G, or H)" in build_prompt(v2) and build_prompt(v2).endswith("H. h")
    lvb = Question(id="z", kind="longvideobench", video=Path("v.mp4"), question="What?", options=OPTIONS)
    assert build_prompt(lvb) == mcq_prompt("longvideobench", "What?", OPTIONS)
    assert build_prompt(lvb).endswith("Answer with the option's letter from the given choices directly.")
    tl = Question(id="t", kind="timelens", video=Path("v.mp4"), question="a cat jumps")
    assert build_prompt(tl) == grounding_prompt("a cat jumps")
    with pytest.raises(ValueError, match="style"):
        mcq_prompt("mmmu", "q", OPTIONS)


def test_training_samples_ask_what_the_eval_asks(tok) -> None:
    rec = _rec()
    seen = set()
    for task, item in sample_items(rec, ["mcq", "grounding"]):
        s = build_sample(tok, rec, task, item, POLICY)
        full = tok.decode(s.input_ids.tolist(), skip_special_tokens=False)
        assert full.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")  # the eval sends it too
        if task == "grounding":
            assert _user_text(tok, s) == grounding_prompt("a red circle is visible")
            continue
        style = pick_style(sample_id(rec["key"], task, item))
        seen.add(style)
        m = rec["mcq"][item]
        q = Question(id="x", kind=style, video=Path("v.mp4"), question=m["question"], options=OPTIONS)
        assert _user_text(tok, s) == build_prompt(q)
    assert seen == set(MCQ_STYLES)  # six questions: every style is trained


def test_pick_style_is_stable_and_spread() -> None:
    ids = [f"c{i:05d}:mcq:{j}" for i in range(50) for j in range(3)]
    assert [pick_style(i) for i in ids] == [pick_style(i) for i in ids]
    counts = {s: sum(pick_style(i) == s for i in ids) for s in MCQ_STYLES}
    assert min(counts.values()) > 25, counts


def test_mcq_orders_ask_each_question_in_several_orders(tok) -> None:
    rec = _rec(n_mcq=2)
    items = sample_items(rec, ["mcq"], mcq_orders=4)
    assert items == [("mcq", k * MCQ_ORDER_STRIDE + i) for k in range(4) for i in range(2)]
    for i in range(2):
        answers, orders = set(), set()
        for k in range(4):
            s = build_sample(tok, rec, "mcq", k * MCQ_ORDER_STRIDE + i, POLICY)
            letter = tok.decode(s.input_ids[s.labels != -100].tolist()).replace("<|im_end|>", "").strip()
            text = _user_text(tok, s)
            lines = [ln for ln in text.splitlines() if ln[:3] in {f"{c}. " for c in "ABCD"}]
            opts = [ln[3:] for ln in lines]
            assert sorted(opts) == sorted(OPTIONS)
            assert opts[ord(letter) - ord("A")] == OPTIONS[rec["mcq"][i]["answer"]]  # the same right option
            if k == 0:
                assert opts == OPTIONS  # order 0: as annotated
            answers.add(letter)
            orders.add(tuple(opts))
        assert len(orders) > 1
    again = build_sample(tok, rec, "mcq", 3 * MCQ_ORDER_STRIDE + 1, POLICY)
    assert (
        again.input_ids == build_sample(tok, rec, "mcq", 3 * MCQ_ORDER_STRIDE + 1, POLICY).input_ids
    ).all()
    with pytest.raises(ValueError, match="mcq_orders"):
        sample_items(rec, ["mcq"], mcq_orders=0)


def test_option_answers_are_the_right_option_text_which_the_eval_maps_to_its_letter(tok) -> None:
    from keye.eval.parsing import parse_choice

    rec = _rec(n_mcq=2)
    items = sample_items(rec, ["mcq"], mcq_orders=3, mcq_answer="option")
    assert items == [
        ("mcq", MCQ_ANSWER_STRIDE + k * MCQ_ORDER_STRIDE + i) for k in range(3) for i in range(2)
    ]
    for (_, item), (_, letter_item) in zip(items, sample_items(rec, ["mcq"], mcq_orders=3), strict=True):
        s = build_sample(tok, rec, "mcq", item, POLICY)
        as_letter = build_sample(tok, rec, "mcq", letter_item, POLICY)
        assert _user_text(tok, s) == _user_text(
            tok, as_letter
        )  # same question, same wording and option order
        said = tok.decode(s.input_ids[s.labels != -100].tolist()).replace("<|im_end|>", "").strip()
        letter = (
            tok.decode(as_letter.input_ids[as_letter.labels != -100].tolist())
            .replace("<|im_end|>", "")
            .strip()
        )
        lines = [ln for ln in _user_text(tok, s).splitlines() if ln[:3] in {f"{c}. " for c in "ABCD"}]
        opts = [ln[3:] for ln in lines]
        assert said == OPTIONS[rec["mcq"][item % MCQ_ORDER_STRIDE]["answer"]] == opts[ord(letter) - ord("A")]
        assert parse_choice(said, len(opts), opts) == letter
        assert s.sample_id != as_letter.sample_id
    with pytest.raises(ValueError, match="mcq_answer"):
        sample_items(rec, ["mcq"], mcq_answer="word")


def test_mcq_turns_ask_a_clips_questions_after_one_view_of_the_frames(tok) -> None:
    """pack.mcq_turns: each sample asks up to N questions of the clip, one per turn; the first turn is exactly the
    single-question sample, every answer carries loss, and every question is asked once per order."""
    rec = _rec(n_mcq=7)
    items = sample_items(rec, ["mcq"], mcq_orders=2, mcq_answer="option", mcq_turns=3)
    base = 2 * MCQ_TURNS_STRIDE + MCQ_ANSWER_STRIDE
    assert items == [("mcq", base + k * MCQ_ORDER_STRIDE + i) for k in range(2) for i in (0, 3, 6)]
    asked = []
    for _, item in items:
        s = build_sample(tok, rec, "mcq", item, POLICY)
        first = item % MCQ_ORDER_STRIDE
        single = build_sample(tok, rec, "mcq", item % MCQ_TURNS_STRIDE, POLICY)
        assert s.sample_id != single.sample_id
        # the single-question sample is the multi-turn one up to its first answer's end of turn
        n = len(single.input_ids)
        assert (s.input_ids[:n] == single.input_ids).all() and (s.labels[:n] == single.labels).all()
        assert s.visual_tokens == single.visual_tokens and len(s.visual_runs) == len(single.visual_runs)
        text = tok.decode(s.input_ids.tolist(), skip_special_tokens=False)
        turns = text.count("<|im_start|>user\n")
        assert turns == min(3, 7 - first)
        labelled = tok.decode(s.input_ids[s.labels != -100].tolist(), skip_special_tokens=False)
        said = labelled.split("<|im_end|>")[:-1]
        questions = [q.split("?")[0] for q in text.split("What colour is shape ")[1:]]
        assert len(said) == len(questions) == turns
        for q, a in zip(questions, said, strict=True):
            assert a.strip() == OPTIONS[int(q) % 4]  # each answer is its own question's right option
        asked += [int(q) for q in questions]
    assert sorted(asked) == sorted(list(range(7)) * 2)
    with pytest.raises(ValueError, match="mcq_turns"):
        sample_items(rec, ["mcq"], mcq_turns=0)
