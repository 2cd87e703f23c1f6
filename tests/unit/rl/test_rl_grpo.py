"""GRPO end to end on a tiny random-weight policy: the mean reward of a toy task rises within seconds; Context-RL's
recovery and the weighting of recovered samples; dynamic sampling; the frozen vision tower."""

from __future__ import annotations

import math

import pytest
import torch

from keye.data.tokenizer import train_bpe
from keye.model import build_model
from keye.rl.advantages import group_advantages
from keye.rl.context_rl import ContextRLSettings, hint_text, mistake_report, recover, with_context
from keye.rl.dynamic_sampling import Collected, collect_groups
from keye.rl.freezing import freeze_vision_and_projector
from keye.rl.grpo import GRPOSettings, grpo_step, train_on_groups
from keye.rl.policy import answer_logprobs
from keye.rl.rollouts import LocalEngine, RolloutPrompt, Sample, SamplingSettings
from keye.serve.chat import ChatModel


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's steps are overhead-bound: one thread is as fast on an idle machine and avoids the
    spin-waiting that makes 2 threads many times slower on a busy one (CI shares its 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["say seven: 7 77 777. the event happens in 1.0 - 2.0 seconds. abc xyz"] * 10, 300, 1)


def _chat(tok, seed=0):
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=seed)
    return ChatModel(model, tok)


def _prompts(n):
    return [RolloutPrompt([{"role": "user", "content": f"say seven {i}"}]) for i in range(n)]


def share_of_digits(text, reference):
    """Toy reward: the share of the answer's characters that are digits (digits are single tokens, 10 of ~300)."""
    return sum(c.isdigit() for c in text) / max(1, len(text))


def _mean_reward(engine, seed):
    groups = engine.rollout(_prompts(8), SamplingSettings(n=8, max_new_tokens=8, temperature=1.0, seed=seed))
    return sum(share_of_digits(s.text, {}) for g in groups for s in g) / 64


def test_grpo_raises_the_mean_reward_of_a_tiny_policy(tok):
    torch.manual_seed(0)
    chat = _chat(tok)
    trained = freeze_vision_and_projector(chat.model)
    assert trained and not any(n.startswith(("vision.", "projector.")) for n in trained)
    engine = LocalEngine(chat)
    before = _mean_reward(engine, seed=123)
    opt = torch.optim.AdamW(
        [p for p in chat.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    settings = GRPOSettings(group_size=8, max_new_tokens=8, temperature=1.0)
    history = []
    for step in range(7):
        m = grpo_step(
            chat, opt, engine, lambda: _prompts(4), share_of_digits, settings, want_groups=4, seed=step
        )
        history.append(m["reward_mean"])
        assert all(math.isfinite(v) for v in m.values())
        assert m["clip_fraction"] == 0.0 and abs(m["ratio_mean"] - 1.0) < 1e-3  # one epoch: on-policy
    after = _mean_reward(engine, seed=123)
    assert before < 0.1 and after > before + 0.2, (before, after, history)
    assert history[-1] > history[0]
    assert all(p.grad is None for p in chat.model.vision.parameters())  # frozen: never touched


def test_dynamic_sampling_drops_zero_variance_groups_and_is_bounded(tok):
    chat = _chat(tok)
    engine = LocalEngine(chat)
    calls = []

    def next_prompts():
        calls.append(1)
        return _prompts(2)

    constant = lambda text, ref: 1.0  # noqa: E731
    got = collect_groups(
        engine,
        next_prompts,
        constant,
        SamplingSettings(n=4, max_new_tokens=3, seed=0),
        2,
        filter_groups=True,
        max_num_gen_batches=3,
    )
    assert (
        got.groups == [] and got.gen_batches == 3 and len(calls) == 3
    )  # never enough signal: stops at the bound
    assert got.zero_variance_groups == got.groups_seen == 6
    calls.clear()
    got = collect_groups(
        engine,
        next_prompts,
        share_of_digits,
        SamplingSettings(n=4, max_new_tokens=3, seed=0),
        2,
        filter_groups=False,
    )
    assert len(got.groups) == 2 and len(calls) == 1


def test_context_rl_recovers_failed_groups_on_the_original_prompt(tok):
    chat = _chat(tok)
    engine = LocalEngine(chat)
    prompts = [RolloutPrompt([{"role": "user", "content": "when?"}], {"span": [1.0, 2.0], "duration": 4.0})]
    sampling = SamplingSettings(n=6, max_new_tokens=4, seed=0)
    groups = engine.rollout(prompts, sampling)
    for s in groups[0]:
        s.reward = 0.0  # every answer failed
    original_ids = groups[0][0].prompt.input_ids
    cfg = ContextRLSettings(success_threshold=0.5, recovered_weight=0.5)
    stats = recover(engine, prompts, groups, lambda text, ref: 1.0, cfg, sampling)
    assert (stats.failed_groups, stats.recovered_groups, stats.recovered_samples) == (
        1,
        1,
        3,
    )  # capped at G // 2
    rec = [s for s in groups[0] if s.recovered]
    assert len(groups[0]) == 9 and len(rec) == 3
    for s in rec:
        assert torch.equal(torch.as_tensor(s.prompt.input_ids), torch.as_tensor(original_ids))  # no hint
        assert s.weight == 0.5 and s.extra["context"] == "Hint: the event happens in 1.0 - 2.0 seconds."
    # the context really was in the prompt they were sampled from
    ctx_prompt = chat.build_prompt(with_context(prompts[0].messages, rec[0].extra["context"]))
    assert len(ctx_prompt.input_ids) > len(original_ids)
    # a group with one success is not resampled
    groups[0][0].reward = 1.0
    assert recover(engine, prompts, [groups[0][:6]], lambda t, r: 1.0, cfg, sampling).failed_groups == 0


def test_hints_and_mistake_reports():
    span = {"span": [1.0, 2.5], "duration": 10.0}
    assert hint_text(span) == "Hint: the event happens in 1.0 - 2.5 seconds."
    assert hint_text(span, "partial") == "Hint: the event happens somewhere between 0.0 and 4.0 seconds."
    mcq = {"answer": "c", "options": ["red", "green", "blue", "grey"]}
    assert hint_text(mcq) == "Hint: the answer is C (blue)."
    assert hint_text(mcq, "partial") == "Hint: the answer is not A."
    assert hint_text({"hint": "look at the end"}) == "look at the end"
    with pytest.raises(ValueError, match="hint"):
        hint_text({})
    failed = Sample(group=0, token_ids=[1], logprobs=[0.0], text="5 - 6", finish_reason="stop", reward=0.0)
    report = mistake_report(failed, span)
    assert '"5 - 6"' in report and "too late" in report and report.endswith(hint_text(span))
    assert "does not state" in mistake_report(Sample(0, [], [], "", "stop"), span)
    msgs = with_context(
        [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}],
        "H",
    )
    assert msgs[1]["content"][-1] == {"type": "text", "text": "\nH"}
    with pytest.raises(ValueError):
        ContextRLSettings(context="oracle")


def test_recovered_samples_are_weighted_and_normalised_with_their_group(tok):
    """A group of 4 failed answers (reward 0) and 2 recovered ones (reward 1, weight 0.5): the update equals the
    hand-built one: advantages over the union of 6, the recovered tokens' loss times 0.5, token-mean over all,
    every log-prob taken on the ORIGINAL prompt."""
    chat = _chat(tok, seed=1)
    base = chat.build_prompt([{"role": "user", "content": "when?"}])
    answers = [[105, 106, 107], [108], [109, 110], [111, 112, 113, 114], [120, 121], [122]]  # plain text ids
    group = [Sample(0, a, [0.0] * len(a), "", "stop", prompt=base, reward=0.0) for a in answers[:4]]
    group += [
        Sample(0, a, [0.0] * len(a), "", "stop", prompt=base, reward=1.0, recovered=True, weight=0.5)
        for a in answers[4:]
    ]
    settings = GRPOSettings(loss_agg_mode="token-mean", micro_batch_size=4, max_grad_norm=1e9)
    params = [p for p in chat.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # look at the gradient only
    train_on_groups(chat, opt, Collected(groups=[group]), settings)
    got = [None if p.grad is None else p.grad.clone() for p in params]
    assert sum(g is not None for g in got) > 10

    adv = group_advantages(torch.tensor([0.0] * 4 + [1.0] * 2), torch.zeros(6, dtype=torch.long))
    std = math.sqrt((4 * (1 / 3) ** 2 + 2 * (2 / 3) ** 2) / 5)
    assert adv[:4].tolist() == pytest.approx([-(1 / 3) / std] * 4, rel=1e-5)
    assert adv[4:].tolist() == pytest.approx([(2 / 3) / std] * 2, rel=1e-5)
    for p in params:
        p.grad = None
    lp = answer_logprobs(chat.model, [base] * 6, answers).logprobs
    w = torch.tensor([1, 1, 1, 1, 0.5, 0.5])
    n_tokens = sum(len(a) for a in answers)
    manual = -(adv[:, None] * w[:, None] * lp).sum() / n_tokens  # ratio 1 at the first epoch: d rho = d logp
    manual.backward()
    for g, p in zip(got, params, strict=True):
        assert (g is None) == (p.grad is None or not p.grad.any())
        if g is not None:
            assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_kl_to_a_frozen_reference_starts_at_zero_and_grows(tok):
    import copy

    chat = _chat(tok, seed=2)
    ref = copy.deepcopy(chat.model).eval().requires_grad_(False)
    engine = LocalEngine(chat)
    opt = torch.optim.AdamW([p for p in chat.model.parameters() if p.requires_grad], lr=1e-2)
    settings = GRPOSettings(group_size=4, max_new_tokens=4, kl_coef=0.1)

    def step(seed, s=settings):
        return grpo_step(
            chat,
            opt,
            engine,
            lambda: _prompts(2),
            share_of_digits,
            s,
            want_groups=2,
            ref_model=ref,
            seed=seed,
        )

    assert step(0)["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    second = step(1)
    assert second["kl"] > 1e-6 and math.isfinite(second["loss"])
    # two PPO epochs: the second pass sees the updated policy against the same old log-probs (ratio moves off 1)
    two = step(2, GRPOSettings(group_size=4, max_new_tokens=4, ppo_epochs=2))
    assert abs(two["ratio_mean"] - 1.0) > 1e-4
    with pytest.raises(ValueError, match="original prompt"):
        train_on_groups(chat, opt, Collected(groups=[[Sample(0, [105], [0.0], "", "stop")]]), settings)
