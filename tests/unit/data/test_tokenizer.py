"""Tokenizer: BPE training, save/load with a content hash, HF directories, and the one chat template."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from keye.data.tokenizer import (
    SPECIAL_TOKENS,
    encode_chat,
    load_tokenizer,
    render_chat,
    train_bpe,
)

CORPUS = [
    "A red circle appears at the top left, then moves right.",
    "The blue square turns green between 3.0 and 4.5 seconds.",
    "Unicode too: café, 東京, emoji 🙂, tabs\tand\nnewlines.",
] * 40


@pytest.fixture(scope="module")
def tok():
    return train_bpe(CORPUS, vocab_size=420)


def _messages() -> list[dict]:
    return [
        {"role": "system", "content": "You are Keye."},
        {
            "role": "user",
            "content": [
                {"type": "video", "frames": [{"time": 0.0, "tokens": 4}, {"time": 12.5, "tokens": 4}]},
                {"type": "image", "tokens": 2},
                {"type": "text", "text": "\n\nWhen does the blue square turn green?"},
            ],
        },
        {
            "role": "assistant",
            "content": "<think>colour change</think>\nThe event happens in 3.0 - 4.5 seconds",
        },
    ]


def test_specials_are_single_tokens_and_roundtrip(tok) -> None:
    for name, text in SPECIAL_TOKENS.items():
        assert tok.encode(text) == [tok.id(name)]
    s = "café 東京 🙂 12.5 seconds"
    assert tok.decode(tok.encode(s)) == s
    digits = tok.tok.encode("2048").tokens
    assert len(digits) == 4  # digits split one by one, so times tokenise uniformly
    assert len(tok) == tok.vocab_size <= 420


def test_encode_chat_equals_encoding_the_rendered_text(tok) -> None:
    for gen in (False, True):
        msgs = _messages()[:-1] if gen else _messages()
        text = render_chat(msgs, add_generation_prompt=gen)
        enc = encode_chat(tok, msgs, add_generation_prompt=gen)
        assert enc.ids.tolist() == tok.encode(text)
        assert [n for _, n in enc.visual_runs] == [4, 4, 2]
        for start, n in enc.visual_runs:
            assert (enc.ids[start : start + n] == tok.image_id).all()
    assert render_chat(_messages()[:-1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert "<|time_start|>12.5 seconds<|time_end|><|vision_start|>" in text


def test_loss_only_on_the_assistant_answer(tok) -> None:
    enc = encode_chat(tok, _messages())
    answer = tok.decode(enc.ids[enc.loss_mask].tolist(), skip_special_tokens=False)
    assert answer == "<think>colour change</think>\nThe event happens in 3.0 - 4.5 seconds<|im_end|>"
    assert (enc.labels[~enc.loss_mask] == -100).all() and (enc.labels[enc.loss_mask] >= 0).all()
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])


def test_save_load_hash_and_tamper_detection(tok, tmp_path) -> None:
    d = tok.save(tmp_path / "tok")
    back = load_tokenizer(d)
    assert back.content_hash() == tok.content_hash()
    assert back.encode("A red circle 3.5") == tok.encode("A red circle 3.5")
    assert json.loads((d / "keye_tokenizer.json").read_text())["sha256"] == tok.content_hash()
    again = train_bpe(CORPUS, vocab_size=420)
    assert again.content_hash() == tok.content_hash()  # deterministic training: same corpus, same artifact
    other = train_bpe(CORPUS[:3] * 5 + ["something else entirely"] * 20, vocab_size=420)
    assert other.content_hash() != tok.content_hash()
    data = json.loads((d / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzz_tampered"] = 10**6
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hash"):
        load_tokenizer(d)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_loads_a_plain_hf_tokenizer_dir_and_adds_missing_specials(tmp_path) -> None:
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # a Qwen-like subset
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    kt = load_tokenizer(d)
    assert kt.source == str(d)
    assert kt.id("im_start") == hf.token_to_id("<|im_start|>")  # existing ids kept
    assert kt.image_id >= len(vocab) and kt.vocab_size == len(vocab) + len(SPECIAL_TOKENS)
    enc = encode_chat(kt, _messages())
    assert enc.ids.tolist() == kt.encode(render_chat(_messages()))
    assert np.unique(enc.ids).size > 10
