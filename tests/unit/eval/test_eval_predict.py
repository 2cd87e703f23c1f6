"""keye_predict_fn: prompts built with the shared chat template and frame plan, answered by a tiny checkpoint."""

import json

import av
import numpy as np
import pytest
import torch

from keye.data.prompts import SYSTEM_PROMPT
from keye.data.sampling import SamplingPolicy, plan_frames
from keye.data.tokenizer import train_bpe
from keye.eval.predict import keye_predict_fn
from keye.eval.readers import read_benchmark
from keye.eval.runner import evaluate, score
from keye.model import build_model, save_checkpoint

POLICY = dict(
    fps=2.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=16,
    total_token_budget=64,
    duration_scaling=False,
)


def _video(path, seconds=2.0, fps=8, w=64, h=48):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((h, w, 3), (i * 12) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    (d / "videos").mkdir()
    _video(d / "videos" / "clip1.mp4")
    bench = d / "tl.json"
    bench.write_text(
        json.dumps({"clip1": {"duration": 2.0, "spans": [[0.5, 1.5], [0, 1]], "queries": ["a", "b"]}})
    )
    tok = train_bpe(["The event happens in 1.0 - 2.0 seconds. Please find the visual event"] * 10, 300, 1)
    tok.save(d / "tok")
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.id("video_pad"), seed=0)
    save_checkpoint(model, d / "ckpt")
    return d, bench, tok, model


def test_prompt_has_the_planned_frames_and_the_benchmark_prompt(setup, monkeypatch):
    d, bench, tok, model = setup
    captured = []

    def fake_generate(model, prompts, **kw):
        captured.extend(prompts)
        return [
            type("R", (), {"token_ids": tok.encode("The event happens in 0.5 - 1.5 seconds")})()
            for _ in prompts
        ]

    monkeypatch.setattr("keye.model.generate.generate", fake_generate)
    fn = keye_predict_fn(d / "ckpt", d / "tok", POLICY)
    qs = read_benchmark(bench, d / "videos").questions
    assert fn(qs) == ["The event happens in 0.5 - 1.5 seconds"] * 2
    plan = plan_frames(2.0, 64, 48, SamplingPolicy(**POLICY), video_fps=8.0)
    p = captured[0]
    ids = p.input_ids.tolist()
    assert ids.count(model.config.image_token_id) == plan.total_tokens
    assert p.patch_grids.shape[0] == plan.n_frames
    assert p.pixel_patches.shape[0] == int(p.patch_grids[:, 1:].prod(dim=1).sum())
    text = tok.decode(ids, skip_special_tokens=False)
    assert "Please find the visual event described by the sentence 'a'" in text
    # laid out as a training sample (keye.data.samples): its system prompt, the question right after the frames
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert "<|frame_end|>Please find the visual event" in text
    assert text.count("seconds<|time_end|>") == plan.n_frames  # a timestamp before every frame
    assert text.endswith("<|im_start|>assistant\n")


def test_blank_frames_keep_the_prompt_and_drop_the_pixels(setup, monkeypatch):
    """The blank-frame control asks the same prompt (same frames, sizes and tokens) with every pixel mid-grey."""
    d, bench, tok, _ = setup
    captured = []

    def fake_generate(model, prompts, **kw):
        captured.extend(prompts)
        return [type("R", (), {"token_ids": tok.encode("The event")})() for _ in prompts]

    monkeypatch.setattr("keye.model.generate.generate", fake_generate)
    fn = keye_predict_fn(d / "ckpt", d / "tok", POLICY)
    qs = read_benchmark(bench, d / "videos").questions
    fn(qs)
    fn(qs, blank_frames=True)
    real, blank = captured[: len(qs)], captured[len(qs) :]
    for r, b in zip(real, blank, strict=True):
        assert torch.equal(r.input_ids, b.input_ids) and torch.equal(r.patch_grids, b.patch_grids)
        assert r.pixel_patches.shape == b.pixel_patches.shape
        assert r.pixel_patches.std() > 0.1
        assert torch.equal(b.pixel_patches, torch.full_like(b.pixel_patches, float(b.pixel_patches[0, 0])))


def test_tiny_checkpoint_runs_through_evaluate(setup, tmp_path):
    d, bench, _, _ = setup
    torch.manual_seed(0)
    fn = keye_predict_fn(d / "ckpt", d / "tok", POLICY, max_new_tokens=4)
    res = evaluate(fn, bench, d / "videos", tmp_path / "out", batch_size=2, report=False)
    rows = [json.loads(x) for x in res.predictions_path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["clip1#0", "clip1#1"] and all(
        isinstance(r["answer"], str) for r in rows
    )
    assert score(bench, res.predictions_path) == res.metrics


def test_undecodable_video_answers_empty_not_crash(setup, tmp_path):
    d, _, _, _ = setup
    vids = tmp_path / "videos"
    vids.mkdir()
    (vids / "broken.mp4").write_bytes(b"not a video at all")
    bench = tmp_path / "tl.json"
    bench.write_text(json.dumps({"broken": {"duration": 2.0, "spans": [[0.5, 1.5]], "queries": ["a"]}}))
    fn = keye_predict_fn(d / "ckpt", d / "tok", POLICY, max_new_tokens=2)
    with pytest.warns(UserWarning, match="broken#0"):
        res = evaluate(fn, bench, vids, tmp_path / "out", report=False)
    assert res.metrics["n_unparsable"] == 1 and res.metrics["mIoU"] == 0.0


def test_a_shared_frame_cache_decodes_each_video_once(setup, monkeypatch):
    """Two questions of one video, asked by two predictors (an eval and its baseline's) and by the blank control:
    one decode, and the prompts are those of a predictor with a cache of its own."""
    from keye.data import video as video_mod
    from keye.data.frame_cache import FrameCache

    d, bench, tok, _ = setup
    captured = []

    def fake_generate(model, prompts, **kw):
        captured.extend(prompts)
        return [type("R", (), {"token_ids": tok.encode("The event")})() for _ in prompts]

    decodes = []
    real_decode = video_mod.decode_frames
    monkeypatch.setattr("keye.model.generate.generate", fake_generate)
    monkeypatch.setattr(
        video_mod, "decode_frames", lambda *a, **k: decodes.append(a[0]) or real_decode(*a, **k)
    )
    qs = read_benchmark(bench, d / "videos").questions
    keye_predict_fn(d / "ckpt", d / "tok", POLICY)(qs)
    assert len(decodes) == 1  # a predictor keeps its own cache: the second question of the video hits
    cache = FrameCache()
    first, second = (keye_predict_fn(d / "ckpt", d / "tok", POLICY, frames_cache=cache) for _ in range(2))
    first(qs)
    second(qs)
    second(qs, blank_frames=True)
    assert len(decodes) == 2 and cache.misses == 2 and cache.hits == 10  # probe + frames, once for all three
    uncached, cached = captured[:2], captured[2:4]
    for a, b in zip(uncached, cached + captured[4:6], strict=False):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_patches, b.pixel_patches)
    blank = captured[6].pixel_patches
    assert torch.equal(captured[6].input_ids, uncached[0].input_ids) and torch.equal(
        blank, torch.full_like(blank, float(blank[0, 0]))
    )
