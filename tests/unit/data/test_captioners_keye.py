"""keye captioner: this project's own (tiny, random-weight) checkpoint saved to tmp_path captions real clips."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from keye.data.captioners import CaptionerError, ClipRef, build_captioner

SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]


def write_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer

    from keye.model import build_model, save_checkpoint

    d = tmp_path_factory.mktemp("ckpt") / "keye-tiny"
    tmp_tok = d.parent / "tokenizer.json"
    n = write_tokenizer(tmp_tok)
    image_id = Tokenizer.from_file(str(tmp_tok)).token_to_id("<|image_pad|>")
    model = build_model("tiny", vocab_size=n, image_token_id=image_id, seed=0)
    save_checkpoint(model, d)
    shutil.copy(tmp_tok, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "noise.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=4)
        st.width, st.height, st.pix_fmt = 84, 56, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (56, 84, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return path


def test_own_checkpoint_captions(ckpt: Path, video: Path) -> None:
    cap = build_captioner(
        {
            "backend": "keye",
            "checkpoint_dir": str(ckpt),
            "max_frames": 2,
            "max_tokens_per_frame": 64,
            "max_new_tokens": 5,
        }
    )
    clip = ClipRef("c0", str(video), 0.0, 2.0, 4.0, 84, 56, "noise")
    (rec,) = cap.caption([clip])
    assert (rec.backend, rec.model, rec.prompt_version) == ("keye", "keye-tiny", "v1")
    assert rec.meta["frame_times"] == [0.0, 1.0] and 1 <= rec.meta["new_tokens"] <= 5
    # the prompt holds, per frame, its timestamp and exactly frame_tokens(h, w) placeholders
    from keye.model.vision_tokens import frame_tokens

    h, w = rec.meta["frame_size"]
    ids = cap.prompt_ids([0.0, 1.0], (h, w), "x")
    assert ids.count(cap._net.config.image_token_id) == 2 * frame_tokens(h, w)
    assert rec.meta["prompt_tokens"] > 2 * frame_tokens(h, w)
    assert rec.ok and rec.caption and rec.meta["finish_reason"] in ("length", "eos")
    again = cap.caption([clip])[0]
    assert again.caption == rec.caption and again.error == rec.error  # greedy: deterministic


def test_incomplete_checkpoint_is_a_clear_error(ckpt: Path, tmp_path: Path, video: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer.json").unlink()
    clip = ClipRef("c0", str(video), 0.0, 1.0, 4.0, 84, 56)
    with pytest.raises(CaptionerError, match="lacks tokenizer.json"):
        build_captioner({"backend": "keye", "checkpoint_dir": str(broken)}).caption([clip])
    with pytest.raises(CaptionerError, match=r"lacks config.json, tokenizer.json, \*.safetensors"):
        build_captioner({"backend": "keye", "checkpoint_dir": str(tmp_path / "nope")}).caption([clip])
