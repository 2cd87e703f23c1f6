"""train_agent_rl end to end on a tiny checkpoint and real derived tasks (a synthetic video, its dense captions,
its visible spans): step checkpoints, per-step trajectory Parquet files, a final/ checkpoint that loads; a run
stopped after step 1 and resumed ends bit-identical to one that never stopped; the SFT-vs-RL agent evaluation
gives the paired test and the self-correction share."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from keye.agent.env import AgentTask
from keye.agent.tasks import corpus, python_tasks, search_tasks
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.model import build_model, save_checkpoint
from keye.model.checkpoint import read_state
from keye.rl.agent_eval import compare, evaluate_agent, summarize
from keye.rl.agent_rl import AgentRLSchedule, AgentToolSettings, env_factory, train_agent_rl
from keye.rl.agent_rollouts import AgentSettings
from keye.rl.grpo import GRPOSettings
from keye.serve.chat import ChatModel

POLICY = SamplingPolicy(
    fps=1.0, min_frames=2, max_frames=4, min_tokens_per_frame=4, max_tokens_per_frame=8,
    total_token_budget=64, duration_scaling=False,
)  # fmt: skip
ANN = {
    "schema": "keye.annotations/v1",
    "video": "evt_00003.mp4",
    "duration": 4.92,
    "caption": "A green square appears at the centre and moves left, then an orange circle appears.",
    "dense_captions": [
        {"start": 0.64, "end": 1.64, "text": "a green square appears at the centre"},
        {"start": 1.98, "end": 2.48, "text": "the green square disappears"},
        {"start": 2.68, "end": 3.68, "text": "an orange circle appears at the top right"},
        {"start": 3.66, "end": 4.16, "text": "the orange circle disappears"},
    ],
    "grounding": [
        {"query": "a green square is visible", "start": 0.64, "end": 2.48},
        {"query": "an orange circle is visible", "start": 2.68, "end": 4.16},
    ],
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent-rl")
    tok = train_bpe(
        [ANN["caption"], *(x["text"] for x in ANN["dense_captions"]), "0.5 - 2.5 seconds <answer>"] * 5,
        320,
        1,
    )
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=0)
    ckpt = save_checkpoint(model, d / "sft")
    tok.save(ckpt)
    (ckpt / "sampling_policy.json").write_text(POLICY.model_dump_json())
    return ckpt


def _tasks() -> list[AgentTask]:
    return search_tasks(ANN) + python_tasks(ANN)


SCHEDULE = dict(lr=1e-3, tasks_per_step=2, keep_last=3, seed=3)
GRPO = GRPOSettings(group_size=2, temperature=1.0, micro_batch_size=4)
AGENT = AgentSettings(group_size=2, max_new_tokens=8, max_response_tokens=64)
TOOLS = AgentToolSettings(tools=("search", "python"), max_turns=2)


def test_train_agent_rl_resumes_bit_exactly_and_writes_trajectories(init, tmp_path):
    docs = corpus([ANN])
    full = train_agent_rl(
        init,
        _tasks(),
        docs,
        tmp_path / "full",
        AgentRLSchedule(steps=2, save_every=1, **SCHEDULE),
        GRPO,
        AGENT,
        TOOLS,
    )
    assert full.steps == 2 and (full.checkpoint_dir / "config.json").is_file()
    assert [p.name for p in full.trajectories] == ["step-000001.parquet", "step-000002.parquet"]
    rows = pq.read_table(full.trajectories[0]).to_pylist()
    assert len(rows) == 4 and {r["task_kind"] for r in rows} <= {"search", "python"}
    assert all(r["model_tokens"] > 0 for r in rows)
    assert set(full.metrics) >= {"reward_mean", "tool_call_rate", "success_rate", "loss"}
    # stopped after step 1, resumed to 2
    part = train_agent_rl(
        init,
        _tasks(),
        docs,
        tmp_path / "part",
        AgentRLSchedule(steps=1, save_every=1, **SCHEDULE),
        GRPO,
        AGENT,
        TOOLS,
    )
    assert part.steps == 1
    resumed = train_agent_rl(
        init,
        _tasks(),
        docs,
        tmp_path / "part",
        AgentRLSchedule(steps=2, save_every=1, **SCHEDULE),
        GRPO,
        AGENT,
        TOOLS,
    )
    a, b = read_state(full.checkpoint_dir), read_state(resumed.checkpoint_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == full.metrics
    assert (
        pq.read_table(resumed.trajectories[1]).to_pylist() == pq.read_table(full.trajectories[1]).to_pylist()
    )
    # a finished run returns at once
    again = train_agent_rl(
        init,
        _tasks(),
        docs,
        tmp_path / "full",
        AgentRLSchedule(steps=2, save_every=1, **SCHEDULE),
        GRPO,
        AGENT,
        TOOLS,
    )
    assert again.steps == 2 and again.metrics == full.metrics
    # SFT vs agent-RL on the same tasks: the paired sign test and the summaries
    sft = ChatModel.from_checkpoint(init)
    rl = ChatModel.from_checkpoint(full.checkpoint_dir)
    make = env_factory(sft, docs, TOOLS)
    before = evaluate_agent(sft, _tasks(), make, max_new_tokens=8, max_response_tokens=64)
    after = evaluate_agent(
        rl, _tasks(), env_factory(rl, docs, TOOLS), max_new_tokens=8, max_response_tokens=64
    )
    assert [r["task_id"] for r in before] == [t.id for t in _tasks()]
    # each row says what the model wrote last and which calls it made (for reading the failures)
    assert all(isinstance(r["answer"], str) and r["answer"] for r in before)
    assert all(bool(r["calls"]) == r["tool_called"] for r in before)
    assert before == evaluate_agent(
        sft, _tasks(), make, max_new_tokens=8, max_response_tokens=64
    )  # greedy: fixed
    result = compare(before, after)
    assert 0.0 <= result["sign_test"]["p_value"] <= 1.0 and set(result["after"]) >= {
        "success_rate",
        "tool_call_rate",
    }
    assert summarize(before)["n_tasks"] == len(_tasks())


def test_summary_counts_self_correction_and_the_sign_test_is_exact():
    def row(i, success, tool, frames, base):
        return {"task_id": f"t{i}", "kind": "frames", "reward": float(success), "success": success,
                "tool_called": tool, "frames_called": frames, "turns": 2, "finish_reason": "answer",
                "baseline_success": base, "self_corrected": frames and success and not base}  # fmt: skip

    before = [row(i, False, False, False, False) for i in range(8)] + [row(8, True, False, False, True)] * 2
    after = [row(i, True, True, True, False) for i in range(8)] + [row(8, True, True, False, True)] * 2
    s = summarize(after)
    assert s["success_rate"] == 1.0 and s["tool_call_rate"] == 1.0 and s["self_correction_share"] == 1.0
    result = compare(before, after)
    assert result["sign_test"]["right_only_here"] == 8 and result["sign_test"]["right_only_in_control"] == 0
    assert result["sign_test"]["p_value"] == pytest.approx(0.5**8) and result["significant_at_0.01"]
    assert result["success_gain"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="not over the same tasks"):
        compare(before, after[::-1])


def test_demonstration_warmup_lowers_the_loss_of_the_teachers_turns(init):
    """The teacher solves every task through the real tools, and supervised steps on its demonstrations (loss on
    the calls and answers only) fit them: what makes a model from scratch write calls RL can reward (measured
    separately: a tiny model writes the search call verbatim after ~160 such steps)."""
    from keye.rl.agent_rl import demo_warmup, demonstrations

    chat = ChatModel.from_checkpoint(init)
    make = env_factory(chat, corpus([ANN]), TOOLS)
    assert len(demonstrations(_tasks(), make)) == len(_tasks())
    demos = demonstrations(search_tasks(ANN)[:1], make)
    prompt, mask = chat.encode(demos[0]["messages"], tools=demos[0]["tools"], add_generation_prompt=False)
    text = chat.tok.decode(prompt.input_ids[mask].tolist(), skip_special_tokens=False)
    assert text.startswith("<tool_call>") and "</answer>" in text and "tool_response" not in text
    torch.manual_seed(0)
    m = demo_warmup(chat, demos, steps=40, lr=4e-3, seed=0)
    assert m["warmup_loss_last"] < m["warmup_loss_first"] / 2, m


def _videos(n: int) -> list[AgentTask]:
    return [t for i in range(n) for t in search_tasks({**ANN, "video": f"evt_{i:05d}.mp4"})]


def test_rl_only_videos_are_kept_from_the_warmup_and_are_all_rl_sees(init, tmp_path):
    """The warm-up memorises its demonstrations (loss ~0.003): RL on the same tasks samples the memorised answer
    in every episode. A seeded share of the training videos is RL's alone, whole videos, never in a demo."""
    from keye.rl.agent_rl import split_for_warmup

    tasks = _videos(10)
    warm, rl = split_for_warmup(tasks, 0.3, seed=3)
    assert {t.video_id for t in warm}.isdisjoint({t.video_id for t in rl})
    assert len({t.video_id for t in rl}) == 3 and len(warm) + len(rl) == len(tasks)
    assert split_for_warmup(tasks, 0.3, seed=3) == (warm, rl)
    assert split_for_warmup(tasks, 0.3, seed=4) != (warm, rl)
    assert split_for_warmup(tasks, 0.0, seed=3) == (tasks, tasks)
    with pytest.raises(ValueError, match="rl_only_fraction"):
        split_for_warmup(tasks, 1.0, seed=3)
    out = train_agent_rl(
        init,
        tasks,
        corpus([{**ANN, "video": f"evt_{i:05d}.mp4"} for i in range(10)]),
        tmp_path / "split",
        AgentRLSchedule(
            steps=2, save_every=2, warmup_steps=1, warmup_lr=1e-3, rl_only_fraction=0.3, **SCHEDULE
        ),
        GRPO,
        AGENT,
        TOOLS,
    )
    seen = {r["task_id"] for p in out.trajectories for r in pq.read_table(p).to_pylist()}
    assert seen and seen <= {t.id for t in rl}, (seen, [t.id for t in rl])


def test_warmup_computes_the_shared_prompt_once_and_trains_the_same(init):
    """The demonstrations open with the same system prompt and tool block: a warm-up step computes it once
    (keye.model.shared_prefix) and takes the step whole samples would, up to the router-balance term."""
    from keye.rl.agent_rl import demo_warmup, demonstrations

    demos = demonstrations(_tasks(), env_factory(ChatModel.from_checkpoint(init), corpus([ANN]), TOOLS))
    whole, shared = (
        demo_warmup(ChatModel.from_checkpoint(init), demos, 3, 1e-3, 0, batch_size=3, no_shared_prefix=off)
        for off in (True, False)
    )
    assert whole["warmup_rows_share"] == 1.0 and shared["warmup_rows_share"] < 0.8, shared
    # (weights after Adam are not compared: Adam turns any rounding of a near-zero gradient into a full lr step;
    # the exact gradients are tests/unit/model/test_shared_prefix.py's)
    for key in ("warmup_loss_first", "warmup_loss_last"):
        assert abs(whole[key] - shared[key]) < 1e-3 * whole[key], (key, whole, shared)
