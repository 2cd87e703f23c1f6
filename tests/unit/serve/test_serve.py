"""`keye serve` as a real server on 127.0.0.1, answered by the official `openai` client: logprobs and token ids,
n > 1, seed reproducibility, a video (path + time range + fps) and image frames, 4xx with a message on bad
requests, concurrent requests batched together, and the `openai` captioner pointed at it."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import av
import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from keye.data.sampling import SamplingPolicy  # noqa: E402
from keye.data.tokenizer import train_bpe  # noqa: E402
from keye.model import build_model, save_checkpoint  # noqa: E402

POLICY = SamplingPolicy(
    fps=2.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=16,
    total_token_budget=64,
    duration_scaling=False,
)


def _video(path, seconds=3.0, fps=8, w=64, h=48):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((h, w, 3), (i * 12) % 255, np.uint8)
            img[:, : w // 3] = (200, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _png(color=(10, 200, 30), size=(40, 56)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), color, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_checkpoint(d):
    """A tiny random-weight checkpoint with its tokenizer and sampling policy beside it."""
    tok = train_bpe(
        ["The event happens in 1.0 - 2.0 seconds. Describe the video: a red bar, colours."] * 10, 320, 1
    )
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=0)
    ckpt = save_checkpoint(model, d / "tiny-ckpt")
    tok.save(ckpt)
    (ckpt / "sampling_policy.json").write_text(POLICY.model_dump_json())
    return ckpt


@pytest.fixture(autouse=True)
def one_torch_thread():
    """This process runs a model beside the server's: one thread each on 2 cores (no spin-waiting)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(d)
    _video(d / "clip.mp4")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one torch thread: the test process runs a model too, and two processes x 2 threads on 2 cores spin-wait
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keye.cli", "serve", str(ckpt), "--port", str(port), "--media-root", str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"keye serve exited: {proc.stdout.read().decode()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("keye serve did not come up in 30 s")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        yield client, base, d, ckpt.name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_models_and_chat_completion_with_logprobs_and_token_ids(server):
    client, _, _, name = server
    assert [m.id for m in client.models.list().data] == [name]
    r = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Describe the video"}],
        max_tokens=6,
        temperature=0.0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )
    (choice,) = r.choices
    ids = choice.model_extra["token_ids"]
    lp = choice.logprobs.content
    assert 1 <= len(ids) <= 6 and len(lp) == len(ids)
    assert [e.token for e in lp] == [f"token_id:{t}" for t in ids]
    for e in lp:  # greedy: the chosen token is the most likely one, and its logprob is the top one
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens > 0
    assert choice.finish_reason in ("stop", "length")


def test_n_samples_and_seed_reproducibility(server):
    client, _, _, name = server
    kw = dict(
        model=name, messages=[{"role": "user", "content": "colours"}], max_tokens=8, temperature=1.0, n=4
    )
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    c = client.chat.completions.create(seed=8, **kw)
    ids = lambda r: [ch.model_extra["token_ids"] for ch in r.choices]
    assert len(a.choices) == 4 and [ch.index for ch in a.choices] == [0, 1, 2, 3]
    assert ids(a) == ids(b)  # same seed, same samples
    assert ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)}) > 1  # the n samples differ from each other


def test_video_and_image_frames_reach_the_model(server):
    client, _, d, name = server
    video = {
        "type": "video_url",
        "video_url": {"url": str(d / "clip.mp4"), "start": 0.5, "end": 2.5, "fps": 1.0},
    }
    r = client.chat.completions.create(
        model=name,
        max_tokens=4,
        temperature=0.0,
        messages=[{"role": "user", "content": [video, {"type": "text", "text": "Describe the video"}]}],
    )
    text_only = client.chat.completions.create(
        model=name,
        max_tokens=4,
        temperature=0.0,
        messages=[{"role": "user", "content": "Describe the video"}],
    )
    # 2 frames (fps 1 over 2 s) of 4 visual tokens each, plus their timestamps, make the prompt longer
    assert r.usage.prompt_tokens >= text_only.usage.prompt_tokens + 8
    img = client.chat.completions.create(
        model=name,
        max_tokens=4,
        temperature=0.0,
        logprobs=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png()}},
                    {"type": "text", "text": "Describe the video"},
                ],
            }
        ],
    )
    other = client.chat.completions.create(
        model=name,
        max_tokens=4,
        temperature=0.0,
        logprobs=True,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png((250, 0, 250))}},
                    {"type": "text", "text": "Describe the video"},
                ],
            }
        ],
    )
    assert img.usage.prompt_tokens == other.usage.prompt_tokens
    assert (
        img.choices[0].logprobs.content[0].logprob != other.choices[0].logprobs.content[0].logprob
    )  # pixels matter


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "audio"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            },
            400,
            "data:",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                        ],
                    }
                ]
            },
            400,
            "cannot be decoded",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/etc/passwd"}}]}
                ]
            },
            400,
            "outside",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": "VIDEO", "start": 2, "end": 1}}
                        ],
                    }
                ]
            },
            400,
            "start",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
        ({"messages": [{"role": "user", "content": "7 " * 15000}], "max_tokens": 4096}, 400, "context"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "not served"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, body, status, words):
    client, base, d, name = server
    body = json.loads(json.dumps(body).replace("VIDEO", str(d / "clip.mp4")))
    body.setdefault("model", name)
    raw = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert raw.status_code == status, raw.text
    assert words in raw.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == status and words in str(e.value)


def test_concurrent_requests_are_batched_and_seeded_per_request(server):
    client, base, _, name = server
    msgs = [[{"role": "user", "content": f"colours {i}"}] for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        outs = list(
            pool.map(
                lambda m: client.chat.completions.create(
                    model=name, messages=m, max_tokens=5, temperature=1.0, seed=1
                ),
                msgs,
            )
        )
    alone = client.chat.completions.create(
        model=name, messages=msgs[3], max_tokens=5, temperature=1.0, seed=1
    )
    assert outs[3].choices[0].model_extra["token_ids"] == alone.choices[0].model_extra["token_ids"]
    assert httpx.get(base + "/health").json()["largest_batch"] > 1  # some of them shared a generate() call


def test_openai_captioner_points_at_keye_serve(server):
    from keye.data.captioners.base import ClipRef
    from keye.data.captioners.openai_compat import OpenAICompatCaptioner

    _, base, d, name = server
    cap = OpenAICompatCaptioner(
        base_url=base + "/v1", model=name, api_key_env=None, max_tokens=8, max_frames=2, max_retries=0
    )
    clip = ClipRef(
        clip_id="c0", video_path=str(d / "clip.mp4"), start=0.0, end=2.0, fps=8.0, width=64, height=48
    )
    (rec,) = cap.caption([clip])
    assert rec.ok, rec.error  # the random model's greedy answer is some text, read as a caption
    usage = rec.meta["usage"]
    assert (
        usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 2 * 4
    )  # two frames of >= 4 visual tokens


def test_openai_rollout_engine_against_keye_serve_matches_local_engine(server):
    """The same checkpoint sampled in process and through the server, with the same seed: same groups, same
    token ids, same sampler logprobs; then one GRPO step on the server's rollouts with truncated IS weights."""
    import torch

    from keye.rl.grpo import GRPOSettings, grpo_step
    from keye.rl.rollouts import LocalEngine, OpenAIEngine, RolloutPrompt, SamplingSettings
    from keye.serve.chat import ChatModel

    _, base, d, name = server
    chat = ChatModel.from_checkpoint(d / name)
    video = {"type": "video_url", "video_url": {"url": str(d / "clip.mp4"), "end": 2.0}}
    prompts = [
        RolloutPrompt(
            [{"role": "user", "content": [video, {"type": "text", "text": "when is the red bar?"}]}],
            {"span": [0.0, 1.0], "duration": 3.0},
        ),
        RolloutPrompt([{"role": "user", "content": "colours"}], {"span": [1.0, 2.0], "duration": 3.0}),
        RolloutPrompt(  # decoded frames in process; sent to the server as lossless PNG video_frames
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "video",
                            "times": [0.0, 0.5],
                            "frames": np.stack(
                                [np.full((48, 64, 3), 30, np.uint8), np.full((48, 64, 3), 220, np.uint8)]
                            ),
                        },
                        {"type": "text", "text": "when?"},
                    ],
                }
            ],
            {"span": [0.0, 0.5], "duration": 1.0},
        ),
    ]
    sampling = SamplingSettings(n=3, max_new_tokens=6, temperature=1.0, seed=11)
    remote = OpenAIEngine(base + "/v1", name, chat, api_key_env=None).rollout(prompts, sampling)
    local = LocalEngine(chat).rollout(prompts, sampling)
    for rg, lg in zip(remote, local, strict=True):
        assert len(rg) == len(lg) == 3
        for r, lo in zip(rg, lg, strict=True):
            assert r.token_ids == lo.token_ids and r.text == lo.text
            assert r.logprobs == pytest.approx(lo.logprobs, abs=1e-4)
            assert torch.equal(torch.as_tensor(r.prompt.input_ids), torch.as_tensor(lo.prompt.input_ids))
    assert remote[0][0].prompt.pixel_patches is not None  # the video's frames are in the trainer's prompt too
    assert remote[2][0].prompt.patch_grids.shape[0] == 2
    opt = torch.optim.SGD([p for p in chat.model.parameters() if p.requires_grad], lr=1e-3)
    engine = OpenAIEngine(base + "/v1", name, chat, api_key_env=None)
    m = grpo_step(
        chat,
        opt,
        engine,
        lambda: prompts,
        lambda text, ref: float(len(text) % 3),
        GRPOSettings(group_size=4, max_new_tokens=6),
        want_groups=2,
        seed=3,
    )
    assert m["groups"] == 2 and all(v == v for v in m.values())  # no NaN with the sampler-mismatch weights on


def test_keye_eval_against_the_endpoint_answers_as_the_checkpoint_in_process(server, tmp_path):
    """`keye eval --endpoint`: the same prompts through the server give the same answers and metrics as the
    checkpoint loaded in process (one template, one frame sampler, greedy)."""
    from keye.eval import evaluate, keye_predict_fn
    from keye.eval.endpoint import endpoint_predict_fn
    from keye.eval.readers import Question

    _, base, d, name = server
    bench = tmp_path / "timelens.json"
    bench.write_text(
        json.dumps(
            {
                "clip": {
                    "duration": 3.0,
                    "spans": [[0.5, 1.5], [1.0, 2.5]],
                    "queries": ["a red bar is visible", "the colour changes"],
                }
            }
        )
    )
    served = evaluate(
        endpoint_predict_fn(base + "/v1", name, max_new_tokens=8),
        bench,
        d,
        tmp_path / "served",
        kind="timelens",
    )
    local = evaluate(
        keye_predict_fn(d / name, max_new_tokens=8), bench, d, tmp_path / "local", kind="timelens"
    )
    assert served.predictions_path.read_text() == local.predictions_path.read_text()
    assert served.metrics["mIoU"] == local.metrics["mIoU"] and served.metrics["n"] == 2
    with pytest.raises(ValueError, match="refused question"):
        endpoint_predict_fn(base + "/v1", "no-such-model")([Question("q", "timelens", d / "clip.mp4", "x")])
