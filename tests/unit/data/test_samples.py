"""Sample builders: task formats, loss on answers only, positions, and visual token counts == the real encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keye.data.samples import (
    build_sample,
    corpus_texts,
    frame_plan,
    grounding_answer,
    sample_items,
    sample_table,
    select_frames,
)
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.model.vision_tokens import frame_tokens

POLICY = SamplingPolicy(
    min_frames=2,
    max_frames=8,
    min_tokens_per_frame=4,
    max_tokens_per_frame=24,
    total_token_budget=96,
    duration_scaling=False,
)


def _rec(
    key: str = "c00000000000000aa", w: int = 224, h: int = 168, duration: float = 8.0, split: str = "train"
):
    return {
        "key": key,
        "duration": duration,
        "fps": 8.0,
        "width": w,
        "height": h,
        "split": split,
        "caption": "A red circle appears, then a blue square turns green.",
        "dense_captions": [
            {"start": 0.5, "end": 2.0, "text": "a red circle appears"},
            {"start": 3.0, "end": 4.5, "text": "the blue square turns green"},
        ],
        "grounding": [{"query": "the blue square turns green", "start": 3.0, "end": 4.5}],
        "mcq": [
            {
                "question": "What colour was the circle?",
                "options": ["red", "blue", "green", "yellow"],
                "answer": 0,
                "start": 0.0,
                "end": 8.0,
            },
            {
                "question": "Which shape changed?",
                "options": list("abcdefgh"),
                "answer": 6,
                "start": 0,
                "end": 8,
            },
        ],
    }


@pytest.fixture(scope="module")
def tok():
    return train_bpe(corpus_texts([_rec()]), vocab_size=600)


def _answer(tok, s) -> str:
    return tok.decode(s.input_ids[s.labels != -100].tolist())


def test_tasks_answers_and_loss_mask(tok) -> None:
    rec = _rec()
    items = sample_items(rec)
    assert items == [("caption", -1), ("dense", -1), ("grounding", 0), ("mcq", 0), ("mcq", 1), ("text", 0)]
    got = {(t, i): build_sample(tok, rec, t, i, POLICY) for t, i in items}
    assert _answer(tok, got[("grounding", 0)]) == "The event happens in 3.0 - 4.5 seconds"
    assert grounding_answer(3, 4.5) == "The event happens in 3.0 - 4.5 seconds"
    assert _answer(tok, got[("mcq", 0)]) == "A" and _answer(tok, got[("mcq", 1)]) == "G"
    assert "H. h" in tok.decode(got[("mcq", 1)].input_ids.tolist())
    assert _answer(tok, got[("caption", -1)]) == rec["caption"]
    assert "3.0 - 4.5 seconds the blue square" in _answer(tok, got[("dense", -1)])
    text = got[("text", 0)]
    assert text.frames == 0 and text.visual_tokens == 0 and not (text.input_ids == tok.image_id).any()
    vid = got[("grounding", 0)]
    full = tok.decode(vid.input_ids.tolist(), skip_special_tokens=False)
    assert full.count("<|time_start|>") == vid.frames == len(frame_plan(rec, POLICY).timestamps)
    stamp = full.index("<|time_start|>0.0 seconds<|time_end|><|vision_start|><|image_pad|>")
    assert stamp < full.index(
        "Please find the visual event"
    )  # frames (with timestamps) come before the question
    assert sample_items({**rec, "mcq": [], "grounding": []}) == [("caption", -1), ("dense", -1)]


def test_positions_equal_model_rope_rule(tok) -> None:
    from keye.model.rope import mrope_positions

    for w, h in ((224, 168), (100, 300), (640, 360)):
        s = build_sample(tok, _rec(w=w, h=h), "mcq", 0, POLICY)
        gh, gw = s.patch_grid()
        ref = mrope_positions(torch.from_numpy(s.input_ids), tok.image_id, [(gh // 2, gw // 2)] * s.frames)
        assert np.array_equal(s.positions(), ref.numpy())
        assert s.positions()[0, 0] == 0


def test_visual_token_count_equals_real_encoder_output(tok) -> None:
    from keye.model import build_model
    from keye.model.patches import patchify

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=len(tok), image_token_id=tok.image_id)
    model.eval()
    for w, h, dur in ((224, 168, 8.0), (96, 400, 3.0), (640, 360, 20.0), (30, 30, 2.0)):
        s = build_sample(tok, _rec(w=w, h=h, duration=dur), "caption", -1, POLICY)
        fh, fw = s.frame_size
        frames = torch.rand(s.frames, 3, fh, fw)
        patches, grids = patchify(frames, 14)
        with torch.no_grad():
            feats = model.vision(patches, grids, None)
            visual = model.projector(feats, [(int(g[1]), int(g[2])) for g in grids])
        assert visual.shape[0] == s.visual_tokens == int((s.input_ids == tok.image_id).sum())
        assert s.visual_tokens == s.frames * frame_tokens(fh, fw)


def test_select_frames_and_cut_plans() -> None:
    assert select_frames(8, 4) == [0, 2, 4, 6]
    assert select_frames(5, 8) == [0, 1, 2, 3, 4] and select_frames(6, 0) == []
    rec = _rec()
    full, cut = frame_plan(rec, POLICY), frame_plan(rec, POLICY, keep_frames=2)
    assert cut.n_frames == 2 and cut.timestamps == [full.timestamps[0], full.timestamps[full.n_frames // 2]]
    assert cut.tokens_per_frame == full.tokens_per_frame


def test_sample_table_counts_and_split(tok) -> None:
    recs = [("shard-a", _rec("c0000000000000001")), ("shard-b", _rec("c0000000000000002", split="heldout"))]
    t = sample_table(recs, tok, POLICY)
    assert set(t.column("key").to_pylist()) == {"c0000000000000001"} and t.num_rows == 6
    row = t.to_pylist()[2]
    s = build_sample(tok, recs[0][1], row["task"], row["item"], POLICY)
    assert (row["tokens"], row["visual_tokens"], row["frames"]) == (s.tokens, s.visual_tokens, s.frames)
    assert sample_table(recs, tok, POLICY, split=None).num_rows == 12


def test_mcq_item_is_a_typed_record_over_the_stored_integer():
    from keye.data.samples import MCQ_ANSWER_STRIDE, MCQ_ORDER_STRIDE, MCQ_TURNS_STRIDE, McqItem

    item = McqItem(question=3, order=2, answer=1, turns=4)
    stored = 3 * MCQ_TURNS_STRIDE + MCQ_ANSWER_STRIDE + 2 * MCQ_ORDER_STRIDE + 3  # the pack index's layout
    assert item.encode() == stored and McqItem.decode(stored) == item
    assert McqItem.decode(7) == McqItem(question=7)  # a plain single-turn letter-answered question
