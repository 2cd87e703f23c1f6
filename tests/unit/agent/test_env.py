"""The environment and its tools on real inputs: `frames` decodes the requested range of a real video through the
training frame sampler, `search` ranks a caption corpus with BM25, `python` runs in the sandbox; broken calls,
failing tools and the turn / call budgets give the model error turns, never an exception."""

from __future__ import annotations

import av
import numpy as np
import pytest

from keye.agent.env import AgentTask, EnvLimits, ToolEnv
from keye.agent.sandbox import SandboxLimits
from keye.agent.search import Document, SearchIndex
from keye.agent.tools import FramesTool, PythonTool, SearchTool
from keye.data.sampling import SamplingPolicy
from keye.rl.rewards import get_reward

POLICY = SamplingPolicy(
    fps=1.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=16,
    total_token_budget=64,
    duration_scaling=False,
)


def make_video(path, seconds=4.0, fps=8, w=64, h=48):
    """Grey level = 20 * second, so a decoded frame tells which second it came from."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((h, w, 3), 40 + 40 * (i // fps), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


CORPUS = [
    Document("a1", "A red car drives past the bakery.", "caption", "vidA", 0.0, 2.0),
    Document("a2", "Subtitle: the password is seven blue herons.", "subtitle", "vidA", 2.0, 3.0),
    Document(
        "a3", "Dense caption: a dog runs across the park, cars parked.", "dense_caption", "vidA", 3.0, 4.0
    ),
    Document("b1", "The password is nine green frogs.", "subtitle", "vidB", 0.0, 1.0),
]


@pytest.fixture
def env(tmp_path):
    video = make_video(tmp_path / "v.mp4")
    tools = [
        FramesTool(POLICY, max_frames=4),
        SearchTool(SearchIndex(CORPUS)),
        PythonTool(SandboxLimits(time_s=3)),
    ]
    e = ToolEnv(tools, get_reward("mcq"), EnvLimits(max_turns=3, max_calls_per_turn=2))
    task = AgentTask(
        "t1",
        [{"role": "user", "content": "Which? A. red B. blue"}],
        {"answer": "B"},
        video=str(video),
        video_id="vidA",
    )
    yield e, task
    e.close()


def call(name, **args):
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_frames_come_from_the_requested_range_at_the_requested_rate(env):
    e, task = env
    assert e.reset(task) == task.messages
    assert [s["function"]["name"] for s in e.tool_specs()] == ["frames", "search", "python"]
    r = e.step("Let me look. " + call("frames", start=2.0, end=4.0, fps=2.0, tokens_per_frame=4))
    assert not r.done and r.reward is None
    (msg,) = r.messages
    video, text = msg["content"]
    assert msg["role"] == "tool" and msg["tool_call_id"] == "call_1_0"
    assert video["type"] == "video" and video["times"] == pytest.approx([2.0, 2.5, 3.0, 3.5])
    frames = video["frames"]
    assert frames.shape[0] == 4 and frames.dtype == np.uint8
    assert (
        frames.shape[1] * frames.shape[2] == 4 * 28 * 28
    )  # 4 tokens per frame (28x28 px after the 2x2 merge)
    # seconds 2 and 3 of the video: grey 120 and 160 (codec noise aside)
    assert abs(frames[0].mean() - 120) < 8 and abs(frames[3].mean() - 160) < 8
    assert text["text"] == "4 frames from 2.0 to 4.0 seconds."
    assert r.calls == [
        {
            "name": "frames",
            "arguments": {"start": 2.0, "end": 4.0, "fps": 2.0, "tokens_per_frame": 4},
            "ok": True,
            "seconds": r.calls[0]["seconds"],
        }
    ]


def test_search_ranks_the_corpus_of_the_tasks_video(env):
    e, task = env
    e.reset(task)
    (msg,) = e.step(call("search", query="what is the password?")).messages
    assert msg["content"] == "[subtitle 2.0-3.0s] Subtitle: the password is seven blue herons."  # not vidB's
    idx = SearchIndex(CORPUS)
    assert [h.doc.id for h in idx.search("car", k=5)] == ["a1", "a3"]  # 'cars' matches 'car'
    assert idx.search("zebra") == [] and idx.backend == "bm25-scan"
    (msg,) = e.step(call("search", query="zebra")).messages
    assert msg["content"] == "No results for 'zebra'."


def test_python_runs_sandboxed_and_the_episode_ends_with_the_reward(env):
    e, task = env
    e.reset(task)
    (msg,) = e.step(call("python", code="sum([3, 4]) * 6")).messages
    assert msg["content"].strip() == "42"
    (msg,) = e.step(call("python", code="while True: pass")).messages
    assert "was stopped" in msg["content"]
    r = e.step("<answer>B</answer>")  # no call: the final answer
    assert r.done and r.reward == 1.0 and r.messages == []


def test_broken_calls_failing_tools_and_budgets_give_error_turns(env):
    e, task = env
    e.reset(task)
    r = e.step(
        '<tool_call>{"name": "frames", "arguments": {"start": 1,}}</tool_call>'
        + call("zoom", x=1)
        + call("search", query="x")
    )
    assert [m["content"][:7] for m in r.messages] == ["Error: "] * 3
    assert "not valid JSON" in r.messages[0]["content"] and "unknown tool 'zoom'" in r.messages[1]["content"]
    assert "at most 2 tool calls per turn" in r.messages[2]["content"]
    assert [c["ok"] for c in r.calls] == [False, False, False]
    r = e.step(call("frames", start=3.0, end=1.0))  # out of range: the tool refuses, the model is told why
    assert r.messages[0]["content"].startswith("Error: need 0 <= start < end <= 4.0 seconds")
    r = e.step(
        call("search", query="car")
    )  # the third turn is the last: the episode ends, the call is not run
    assert r.done and r.reward == 0.0 and r.calls[0]["error"] == "not run: the episode ended"


def test_a_task_without_video_gets_an_error_not_a_crash(env):
    e, _ = env
    e.reset(AgentTask("t2", [{"role": "user", "content": "2+2?"}], {"answer": "A"}))
    r = e.step(call("frames", start=0, end=1))
    assert r.messages[0]["content"] == "Error: this task has no video to look at"
