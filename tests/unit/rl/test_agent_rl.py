"""Agent RL on tiny real models: a multi-turn trajectory is token for token the conversation the chat template
renders, its mask covers exactly the model's tokens (tool outputs, frames included, are masked), the trainer's
scores of the sampled tokens equal the sampler's (ratio 1 on-policy), trajectories land in a Parquet table, and
two agent GRPO steps resume exactly from a checkpoint taken between them."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from keye.agent.env import AgentTask, EnvLimits, ToolEnv
from keye.agent.search import Document, SearchIndex
from keye.agent.tools import FramesTool, SearchTool
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import encode_chat, train_bpe
from keye.model import build_model
from keye.model.generate import GenerationResult
from keye.rl.agent_grpo import agent_grpo_step
from keye.rl.agent_rollouts import AgentSettings, agent_rollout, trajectory_rows, write_trajectories
from keye.rl.grpo import GRPOSettings
from keye.rl.sequence_policy import response_logprobs
from keye.serve.chat import ChatModel

POLICY = SamplingPolicy(
    fps=1.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=8,
    total_token_budget=64,
    duration_scaling=False,
)
CALL = '<tool_call>\n{"name": "search", "arguments": {"query": "password"}}\n</tool_call>'
CORPUS = [
    Document("a", "the password is 77 blue herons", "subtitle", "v", 1.0, 2.0),
    Document("b", "a red bar moves", "caption", "v", 0.0, 1.0),
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(
        [f"what is the password? {CALL} say 7 77. Look at 1.0 - 2.0 seconds <answer>B</answer>"] * 10, 320, 1
    )


def _video(path, seconds=3.0, fps=8, w=56, h=56):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((h, w, 3), (i * 9) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def digits(text, reference):
    """Toy verifiable reward: the share of digits in the final answer."""
    return sum(c.isdigit() for c in text) / max(1, len(text))


def _chat(tok, seed=0):
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=seed)
    return ChatModel(model, tok, POLICY)


class Scripted:
    """Plays fixed assistant turns as the sampled tokens (their canonical encoding + eos), one per call."""

    def __init__(self, chat, turns):
        self.chat, self.turns, self.calls = chat, turns, 0

    def __call__(self, model, prompts, **kw):
        text = self.turns[self.calls]
        self.calls += 1
        ids = self.chat.tok.encode(text) + [self.chat.tok.eos_id]
        return [GenerationResult(ids, [-0.5] * len(ids), "eos", text) for _ in prompts]


def test_the_trajectory_is_the_rendered_conversation_and_its_mask_covers_exactly_the_model_tokens(
    tok, tmp_path
):
    chat = _chat(tok)
    video = _video(tmp_path / "v.mp4")
    look = (
        '<tool_call>\n{"name": "frames", "arguments": {"start": 1.0, "end": 3.0, "fps": 1.0}}\n</tool_call>'
    )
    turns = ["Look again. " + look, "Search too. " + CALL, "<answer>B</answer>"]
    make_env = lambda: ToolEnv([FramesTool(POLICY), SearchTool(SearchIndex(CORPUS))], digits, EnvLimits(4, 2))  # noqa: E731
    task = AgentTask(
        "t", [{"role": "user", "content": "what is the password?"}], {}, video=str(video), video_id="v"
    )
    (group,) = agent_rollout(
        chat, [task], make_env, AgentSettings(group_size=1), seed=0, generate_fn=Scripted(chat, turns)
    )
    (traj,) = group
    assert (
        traj.finish_reason == "answer"
        and traj.turns == 3
        and [c["name"] for c in traj.calls] == ["frames", "search"]
    )
    assert all(c["ok"] for c in traj.calls)
    # the same conversation through the one chat template, rebuilt from scratch
    specs = make_env().tool_specs()
    env = make_env()
    env.reset(task)
    convo = [dict(m) for m in task.messages]
    starts, lengths = [], []
    for text in turns:
        starts.append(len(chat.build_prompt(convo, tools=specs).input_ids))
        lengths.append(len(tok.encode(text)) + 1)  # + <|im_end|>
        convo.append({"role": "assistant", "content": text})
        convo.extend(env.step(text).messages)
    env.close()
    full = chat.build_prompt(convo, tools=specs, add_generation_prompt=False)
    assert traj.full_ids() == full.input_ids.tolist()[: len(traj.full_ids())]
    assert len(full.input_ids) == len(traj.full_ids()) + 1  # the template's "\n" after the last <|im_end|>
    assert torch.equal(traj.pixel_patches, full.pixel_patches) and torch.equal(
        traj.patch_grids, full.patch_grids
    )
    p = len(traj.prompt.input_ids)
    expect = np.zeros(len(traj.response), bool)
    for s, n in zip(starts, lengths, strict=True):
        expect[s - p : s - p + n] = True
    assert np.array_equal(np.array(traj.model_mask), expect)
    resp = np.array(traj.response)
    assert (
        resp[~expect] == tok.image_id
    ).sum() == 2 * 4  # the frames tool turn's 2 frames x 4 tokens: masked
    assert (resp[expect] != tok.image_id).all()
    masked_text = tok.decode(resp[~expect].tolist(), skip_special_tokens=False)
    assert (
        "<tool_response>" in masked_text
        and "77 blue herons" in masked_text
        and "<tool_call>" not in masked_text
    )
    # the loss mask of encode_chat over the same messages (frames given as token counts) agrees
    n_tok = int(traj.patch_grids[0].prod()) // 4
    rendered = [
        {
            **m,
            "content": [
                {"type": "video", "frames": [{"time": t, "tokens": n_tok} for t in m["content"][0]["times"]]},
                m["content"][1],
            ],
        }
        if m["role"] == "tool" and isinstance(m["content"], list)
        else m
        for m in convo
    ]
    enc = encode_chat(tok, rendered, tools=specs)
    assert np.array_equal(enc.loss_mask[p : p + len(expect)], expect)
    # scoring gives log-probs exactly on the model tokens, zero elsewhere
    scores = response_logprobs(
        chat.model,
        [traj.prompt],
        [traj.response],
        [traj.model_mask],
        [traj.pixel_patches],
        [traj.patch_grids],
    )
    assert torch.equal(scores.mask[0].bool(), torch.tensor(expect))
    assert (scores.logprobs[0][~torch.tensor(expect)] == 0).all() and (
        scores.logprobs[0][torch.tensor(expect)] < 0
    ).all()


def teach_search_call(tok, steps=150):
    """A tiny policy trained to open with the search call (so rollouts are really multi-turn)."""
    torch.manual_seed(0)
    chat = _chat(tok)
    env = ToolEnv([SearchTool(SearchIndex(CORPUS))], digits)
    convo = [{"role": "user", "content": "what is the password?"}, {"role": "assistant", "content": CALL}]
    enc = encode_chat(tok, convo, tools=env.tool_specs())
    ids, labels = torch.from_numpy(enc.ids), torch.from_numpy(enc.labels)
    opt = torch.optim.AdamW(chat.model.parameters(), lr=4e-3)
    for _ in range(steps):
        loss = chat.model(input_ids=ids, labels=labels).loss
        if float(loss.detach()) < 0.02:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return chat


def _tasks(n=2):
    return [
        AgentTask(
            f"q{i}", [{"role": "user", "content": "what is the password?"}], {}, video_id="v", kind="search"
        )
        for i in range(n)
    ]


def _env():
    return ToolEnv([SearchTool(SearchIndex(CORPUS))], digits, EnvLimits(max_turns=3, max_calls_per_turn=1))


SETTINGS = GRPOSettings(group_size=4, temperature=1.0, micro_batch_size=4)
AGENT = AgentSettings(group_size=4, max_new_tokens=48, max_response_tokens=320)


def test_agent_grpo_trains_model_tokens_on_policy_stores_trajectories_and_resumes_exactly(tok, tmp_path):
    chat = teach_search_call(tok)
    state = {k: v.clone() for k, v in chat.model.state_dict().items()}
    opt = torch.optim.AdamW(chat.model.parameters(), lr=1e-3, weight_decay=0.0)
    m1, groups = agent_grpo_step(chat, opt, _tasks(), _env, SETTINGS, AGENT, seed=1)
    trajs = [t for g in groups for t in g]
    assert all(math.isfinite(v) for v in m1.values())
    assert m1["tool_call_rate"] > 0.5 and m1["turns_mean"] > 1.0, m1  # really multi-turn
    assert any(t.tool_tokens > 0 for t in trajs)
    assert (
        abs(m1["ratio_mean"] - 1.0) < 1e-3 and m1["clip_fraction"] == 0.0
    )  # trainer == sampler on model tokens
    # the sampler's log-probs are the trainer's on the model tokens (before the update: same weights)
    ref = _chat(tok)
    ref.model.load_state_dict(state)
    t = max(trajs, key=lambda t: t.tool_tokens)
    s = response_logprobs(
        ref.model, [t.prompt], [t.response], [t.model_mask], [t.pixel_patches], [t.patch_grids]
    )
    mask = torch.tensor(t.model_mask)
    assert torch.allclose(s.logprobs[0][mask], torch.tensor(t.logprobs)[mask], atol=1e-4)
    # trajectories as a Parquet table with their tool calls
    path = write_trajectories(tmp_path / "traj.parquet", trajectory_rows(groups, step=1))
    table = pq.read_table(path).to_pylist()
    assert len(table) == 8 and {r["task_id"] for r in table} == {"q0", "q1"}
    with_calls = [r for r in table if r["tool_calls"]]
    calls = [c for r in with_calls for c in json.loads(r["calls_json"])]
    assert calls and all({"turn", "name", "arguments", "ok", "seconds"} <= set(c) for c in calls)
    assert any(c["ok"] and c["name"] == "search" and c["arguments"] == {"query": "password"} for c in calls)
    assert any("search" in r["tools_used"] for r in table)
    assert all(r["model_tokens"] + r["tool_tokens"] > 0 for r in table)
    # checkpoint between the steps, then step 2 twice: continued, and resumed in a fresh model + optimizer
    torch.save({"model": chat.model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    m2, _ = agent_grpo_step(chat, opt, _tasks(), _env, SETTINGS, AGENT, seed=2)
    fresh = _chat(tok, seed=5)
    saved = torch.load(tmp_path / "ckpt.pt")
    fresh.model.load_state_dict(saved["model"])
    opt2 = torch.optim.AdamW(fresh.model.parameters(), lr=1e-3, weight_decay=0.0)
    opt2.load_state_dict(saved["opt"])
    m2b, _ = agent_grpo_step(fresh, opt2, _tasks(), _env, SETTINGS, AGENT, seed=2)
    for (name, a), b in zip(chat.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert {k: v for k, v in m2.items() if "per_s" not in k and "seconds" not in k} == {
        k: v for k, v in m2b.items() if "per_s" not in k and "seconds" not in k
    }
