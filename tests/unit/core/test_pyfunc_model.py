"""The registered checkpoint as an MLflow pyfunc chat model: saved with a signature, loaded by MLflow, answering
exactly what keye's own prediction path answers for the same chat (one prompt code, not a copy)."""

from __future__ import annotations

import json

import av
import numpy as np
import pandas as pd
import pytest

from keye.core.tracking import chat_of, load_registered, save_chat_model
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.eval.predict import keye_chat_fn
from keye.model import build_model, save_checkpoint
from keye.train.bundle import bundle_checkpoint

POLICY = SamplingPolicy(
    fps=2.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=16,
    total_token_budget=64,
)


def _video(path, seconds=2.0, fps=8, w=64, h=48):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((h, w, 3), (i * 29) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyfunc")
    _video(d / "clip.mp4")
    tok = train_bpe(["What colour is the shape? It is red. The circle moves left."] * 10, 300, 1)
    tok.save(d / "tok")
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.id("video_pad"), seed=0)
    save_checkpoint(model, d / "ckpt")
    bundle_checkpoint(d / "ckpt", d / "tok", POLICY)
    return d


def test_chat_rows_put_the_video_in_the_first_user_turn():
    row = {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "video": "/v.mp4",
    }
    assert chat_of(row)[1]["content"] == [{"type": "video", "video": "/v.mp4"}, {"type": "text", "text": "q"}]
    assert chat_of({"messages": [{"role": "user", "content": "q"}], "video": None})[0]["content"] == "q"
    with pytest.raises(ValueError, match="user turn"):
        chat_of({"messages": [{"role": "system", "content": "s"}], "video": "/v.mp4"})


def test_pyfunc_model_has_a_signature_and_answers_like_keye(bundle, tmp_path):
    path = save_chat_model(bundle / "ckpt", tmp_path / "model", max_new_tokens=6)
    mlmodel = (path / "MLmodel").read_text()
    assert "signature:" in mlmodel and "messages" in mlmodel and "python_function" in mlmodel
    model = load_registered(str(path))
    rows = [
        {
            "messages": [{"role": "user", "content": "What colour is the shape?"}],
            "video": str(bundle / "clip.mp4"),
        },
        {"messages": [{"role": "user", "content": "The circle moves"}], "video": None},
    ]
    answers = model.predict(pd.DataFrame(rows))
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # the same answers from keye's own prediction path
    direct = keye_chat_fn(bundle / "ckpt", max_new_tokens=6)([chat_of(r) for r in rows])
    assert answers == direct
    # a wrong input is refused by the signature, naming the column
    with pytest.raises(Exception, match="messages"):
        model.predict(pd.DataFrame([{"video": "x"}]))
    (policy,) = (path / "artifacts").rglob("sampling_policy.json")  # the checkpoint travels inside the model
    assert json.loads(policy.read_text())["fps"] == 2.0
