"""MOPD on tiny random-weight models: the per-token advantage and the gated loss by hand, masks, the exact
full-vocabulary reverse KL, routing by domain (never averaged; an unknown domain is a clear error), the text
teacher's own view (the transcript, no frames), a student's reverse KL to a fixed teacher falling, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.model import build_model
from keye.rl.advantages import group_advantages
from keye.rl.freezing import freeze_vision_and_projector
from keye.rl.mopd import (
    MOPDSettings,
    full_vocab_reverse_kl,
    mopd_advantages,
    mopd_loss,
    mopd_step,
    train_on_samples,
)
from keye.rl.policy import answer_logprobs
from keye.rl.rollouts import LocalEngine, RolloutPrompt, Sample, SamplingSettings
from keye.rl.teachers import (
    CheckpointTeacher,
    TeacherRouter,
    UnknownDomainError,
    transcript_text,
    view_messages,
)
from keye.serve.chat import ChatModel

POLICY = SamplingPolicy(
    fps=2.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=16,
    total_token_budget=64,
    duration_scaling=False,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(
        ["the red square moves left. when does it happen? 1.0 - 2.0 seconds. answer A B C D. transcript"]
        * 10,
        300,
        1,
    )


def _chat(tok, seed):
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=seed)
    return ChatModel(model, tok, POLICY, name=f"m{seed}")


def _frames(n=2, h=32, w=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def _video_prompt(i, domain, transcript="the red square moves left\n[1.0 - 2.0 s] it stops"):
    return RolloutPrompt(
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "frames": _frames(), "times": [0.0, 0.5]},
                    {"type": "text", "text": f"when does it happen? {i}"},
                ],
            }
        ],
        {"domain": domain, "transcript": transcript},
        id=f"{domain}-{i}",
    )


def _text_prompts(n, domains=("grounding", "mcq")):
    return [
        RolloutPrompt(
            [{"role": "user", "content": f"answer {i}"}], {"domain": domains[i % len(domains)]}, f"p{i}"
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------ by hand
def test_per_token_advantage_by_hand():
    teacher = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]])
    student = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -1.0, 0.0]])
    outcome = group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert outcome.tolist() == pytest.approx([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)], rel=1e-5)
    a = 0.2 * 0.5 / math.sqrt(0.5)
    adv = mopd_advantages(
        teacher, student, outcome, alpha=0.2, teacher_mask=torch.tensor([[1, 1, 1], [1, 0, 0.0]])
    )
    want = [[0.5 + a, -1.0 + a, 0.0 + a], [1.0 - a, 0.0 - a, 0.0 - a]]
    assert adv.tolist() == [pytest.approx(r, abs=1e-6) for r in want]
    # stop-gradient: the advantage carries no gradient into the student
    s = student.clone().requires_grad_(True)
    assert not mopd_advantages(teacher, s, outcome, 1.0).requires_grad


def test_gated_loss_edges_and_masks_by_hand():
    """Ratios exactly at eps_low / eps_high are kept, just outside are dropped; masked tokens carry nothing; the
    gradient on log pi is -w_t A_t / |y| (seq-mean-token-mean)."""
    sampler = torch.zeros(1, 6, dtype=torch.float64)
    logp = torch.tensor(
        [[math.log(0.5), math.log(2.0), math.log(0.49), math.log(2.01), 0.0, 0.3]], dtype=torch.float64
    ).requires_grad_(True)
    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.float64)  # last token: not a model token
    out = mopd_loss(logp, sampler, adv, mask, eps_low=0.5, eps_high=2.0)
    out.loss.backward()
    w = torch.tensor([0.5, 2.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert logp.grad[0].tolist() == pytest.approx((-w * adv[0] / 5).tolist(), abs=1e-12)
    assert float(out.gate_fraction) == pytest.approx(3 / 5)
    assert float(out.loss.detach()) == pytest.approx(float(-(w * adv[0] * logp[0].detach()).sum() / 5))
    with pytest.raises(ValueError, match="eps_low"):
        MOPDSettings(eps_low=1.5)


def test_full_vocab_reverse_kl_by_hand():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.25, 0.25])
    s_full = p.log()[None, None].clone().requires_grad_(True)
    kl = full_vocab_reverse_kl(s_full, q.log()[None, None])
    want = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    assert float(kl.detach()) == pytest.approx(want, rel=1e-6)
    kl.sum().backward()
    # d KL / d log p_v = p_v (log p_v - log q_v + 1)
    assert s_full.grad[0, 0].tolist() == pytest.approx((p * (p.log() - q.log() + 1)).tolist(), rel=1e-5)
    assert float(full_vocab_reverse_kl(q.log()[None, None], q.log()[None, None])) == pytest.approx(
        0.0, abs=1e-7
    )


# ------------------------------------------------------------------------------------------------ routing
class Spy:
    """A teacher wrapper recording what it was asked to score."""

    def __init__(self, inner):
        self.inner, self.name, self.view, self.seen = inner, inner.name, inner.view, []

    def score(self, prompts, answers, **kw):
        self.seen.extend(p.id for p in prompts)
        return self.inner.score(prompts, answers, **kw)


def test_each_prompt_goes_to_its_domains_teacher_only(tok):
    ta, tb = CheckpointTeacher(_chat(tok, 1)), CheckpointTeacher(_chat(tok, 2))
    spy_a, spy_b = Spy(ta), Spy(tb)
    router = TeacherRouter({"grounding": spy_a, "mcq": spy_b})
    prompts = _text_prompts(5)
    answers = [[105, 106, 107], [108], [109, 110], [111, 112, 113, 114], [120]]
    scores, domains = router.score(prompts, answers)
    assert domains == ["grounding", "mcq", "grounding", "mcq", "grounding"]
    assert spy_a.seen == ["p0", "p2", "p4"] and spy_b.seen == ["p1", "p3"]
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        own = (ta if i % 2 == 0 else tb).score([p], [a])
        other = (tb if i % 2 == 0 else ta).score([p], [a])
        assert torch.allclose(scores.logprobs[i, : len(a)], own.logprobs[0], atol=1e-5)  # its own teacher
        assert not torch.allclose(scores.logprobs[i, : len(a)], other.logprobs[0])  # never the other / a mean
        assert scores.mask[i].sum() == len(a)
    bad = [*prompts, RolloutPrompt([{"role": "user", "content": "x"}], {"domain": "ocr"}, "p9")]
    with pytest.raises(UnknownDomainError) as err:
        router.score(bad, [*answers, [105]])
    msg = str(err.value)
    assert "p9" in msg and "'ocr'" in msg and "['grounding', 'mcq']" in msg
    # mopd_step refuses before sampling anything
    chat = _chat(tok, 0)
    with pytest.raises(UnknownDomainError, match="ocr"):
        mopd_step(
            chat,
            torch.optim.SGD(chat.model.parameters(), lr=0.0),
            LocalEngine(chat),
            lambda: bad[-1:],
            lambda t, r: 0.0,
            router,
            MOPDSettings(group_size=2, max_new_tokens=2),
        )


def test_text_teacher_sees_the_transcript_and_no_frames(tok):
    student = _chat(tok, 0)
    video_t = CheckpointTeacher(_chat(tok, 1), view="video", name="video")
    text_t = CheckpointTeacher(_chat(tok, 2), view="text", name="text")
    seen: dict[str, list] = {"video": [], "text": []}

    def hook(name):
        def record(module, args, kwargs):
            seen[name].append((kwargs["input_ids"].clone(), kwargs.get("pixel_patches")))

        return record

    video_t.chat.model.register_forward_pre_hook(hook("video"), with_kwargs=True)
    text_t.chat.model.register_forward_pre_hook(hook("text"), with_kwargs=True)
    router = TeacherRouter({"grounding": video_t, "caption": text_t})
    transcript = transcript_text(
        "the red square moves left",
        [{"start": 1.0, "end": 2.0, "text": "it stops"}, {"start": 0, "end": 1, "text": "it moves"}],
    )
    assert transcript == "the red square moves left\n[0.0 - 1.0 s] it moves\n[1.0 - 2.0 s] it stops"
    prompts = [_video_prompt(0, "grounding"), _video_prompt(1, "caption", transcript)]
    assert student.build_prompt(prompts[1].messages).pixel_patches is not None  # the student does see frames
    router.score(prompts, [[105, 106], [107, 108, 109]])
    ((vid_ids, vid_pix),) = seen["video"]
    ((txt_ids, txt_pix),) = seen["text"]
    image_id = tok.image_id
    assert vid_pix is not None and (vid_ids == image_id).any()  # the video teacher got the frames
    assert txt_pix is None and not (txt_ids == image_id).any()  # the text teacher: no pixels, no image tokens
    decoded = tok.decode(txt_ids.tolist(), skip_special_tokens=False)
    assert "[1.0 - 2.0 s] it stops" in decoded and "the red square moves left" in decoded
    with pytest.raises(ValueError, match="transcript"):
        view_messages(_video_prompt(2, "caption", transcript=""), "text")


def test_token_masks_remove_tokens_from_the_update(tok):
    """A tool-output token masked by token_masks gets no gradient: the update equals the one without that token's
    loss; a sample whose every token is masked contributes nothing."""
    chat = _chat(tok, 3)
    teacher = CheckpointTeacher(_chat(tok, 4))
    router = TeacherRouter({"grounding": teacher, "mcq": teacher})
    prompts = _text_prompts(2)
    base = [chat.build_prompt(p.messages) for p in prompts]
    answers = [[105, 106, 107], [108, 109]]
    with torch.no_grad():
        lp0 = answer_logprobs(chat.model, base, answers).logprobs
    groups = [
        [Sample(i, a, lp0[i, : len(a)].tolist(), "", "stop", prompt=base[i], reward=0.0)]
        for i, a in enumerate(answers)
    ]
    settings = MOPDSettings(alpha=0.0, loss_agg_mode="token-sum", max_grad_norm=1e9)
    params = [p for p in chat.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    train_on_samples(chat, opt, prompts, groups, router, settings, token_masks=[[1, 0, 1], [0, 0]])
    got = [p.grad.clone() for p in params if p.grad is not None]
    opt.zero_grad()
    t = teacher.score(prompts, answers).logprobs
    lp = answer_logprobs(chat.model, base, answers).logprobs
    keep = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    manual = -((t - lp.detach()) * keep * lp).sum()
    manual.backward()
    want = [p.grad for p in params if p.grad is not None]
    assert len(got) == len(want) > 5
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ training
def _sharp_teacher(tok, seed, scale=4.0):
    """A fixed teacher with a peaked distribution (a random model's is near-uniform, as is the student's)."""
    chat = _chat(tok, seed)
    with torch.no_grad():
        chat.model.lm.norm.weight.mul_(scale)
    return CheckpointTeacher(chat)


def _run(chat, router, settings, steps, start=0, opt=None):
    opt = opt or torch.optim.AdamW(
        [p for p in chat.model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0
    )
    engine = LocalEngine(chat)
    digits = lambda text, ref: sum(c.isdigit() for c in text) / max(1, len(text))  # noqa: E731
    hist = [
        mopd_step(chat, opt, engine, lambda: _text_prompts(4), digits, router, settings, seed=s)
        for s in range(start, start + steps)
    ]
    return hist, opt


def _exact_reverse_kl(chat, router):
    """The student's exact reverse KL to its teachers, on a fixed set of its own samples (seeded)."""
    prompts = _text_prompts(8)
    groups = LocalEngine(chat).rollout(prompts, SamplingSettings(n=4, max_new_tokens=6, seed=999))
    samples = [s for g in groups for s in g]
    answers = [s.token_ids for s in samples]
    teach, _ = router.score([prompts[s.group] for s in samples], answers, full=True)
    with torch.no_grad():
        st = answer_logprobs(chat.model, [s.prompt for s in samples], answers, with_full=True)
    return float((full_vocab_reverse_kl(st.full, teach.full) * st.mask).sum() / st.mask.sum())


@pytest.mark.parametrize(("full", "lr", "group", "drop"), [(False, 1e-3, 8, 0.9), (True, 3e-3, 4, 0.75)])
def test_reverse_kl_to_a_fixed_teacher_falls(tok, full, lr, group, drop):
    """Sampled (one token per position: noisy, so a small step) and exact full-vocabulary variants."""
    torch.manual_seed(0)
    chat = _chat(tok, 0)
    freeze_vision_and_projector(chat.model)
    router = TeacherRouter({"grounding": _sharp_teacher(tok, 1), "mcq": _sharp_teacher(tok, 2)})
    before = _exact_reverse_kl(chat, router)
    settings = MOPDSettings(group_size=group, max_new_tokens=6, alpha=0.0, full_vocab_kl=full)
    opt = torch.optim.AdamW([p for p in chat.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    hist, _ = _run(chat, router, settings, 8, opt=opt)
    after = _exact_reverse_kl(chat, router)
    assert before > 0.3 and after < drop * before, (before, after, [h["reverse_kl"] for h in hist])
    for d in ("grounding", "mcq"):
        assert all(math.isfinite(h[f"{d}/reverse_kl"]) and h[f"{d}/response_length"] > 0 for h in hist)
        assert all(math.isfinite(h[f"{d}/reward"]) and h[f"{d}/samples"] == 2 * group for h in hist)
    assert hist[0]["gate_fraction"] == pytest.approx(1.0)  # on-policy: every ratio is 1
    assert all(p.grad is None for p in chat.model.vision.parameters())
    for t in router.table.values():  # teachers frozen
        assert all(not p.requires_grad and p.grad is None for p in t.chat.model.parameters())


def test_exact_resume_of_mopd_steps(tok, tmp_path):
    """Three steps in one go equal two steps, a save (model + optimizer), a reload and the third, bitwise."""
    router = TeacherRouter(
        {"grounding": CheckpointTeacher(_chat(tok, 1)), "mcq": CheckpointTeacher(_chat(tok, 2))}
    )
    settings = MOPDSettings(group_size=2, max_new_tokens=4, alpha=0.5)
    straight = _chat(tok, 0)
    hist, _ = _run(straight, router, settings, 3)

    first = _chat(tok, 0)
    _, opt = _run(first, router, settings, 2)
    torch.save({"model": first.model.state_dict(), "opt": opt.state_dict()}, tmp_path / "state.pt")
    resumed = _chat(tok, 5)  # other weights: the load must bring everything back
    state = torch.load(tmp_path / "state.pt")
    resumed.model.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(resumed.model.parameters(), lr=3e-3, weight_decay=0.0)
    opt2.load_state_dict(state["opt"])
    (third,), _ = _run(resumed, router, settings, 1, start=2, opt=opt2)
    timing = ("seconds", "per_s")
    for k, v in hist[2].items():
        if not any(t in k for t in timing):
            assert third[k] == v, k
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_teachers_the_update_is_grpos(tok):
    """Outcome-only (a specialist's RL): on-policy, one epoch, the gradient equals keye.rl.grpo's."""
    from keye.rl.dynamic_sampling import Collected
    from keye.rl.grpo import GRPOSettings, train_on_groups

    chat = _chat(tok, 6)
    prompts = _text_prompts(2)
    base = [chat.build_prompt(p.messages) for p in prompts]
    answers = [[105, 106, 107], [108], [109, 110], [111, 112, 113, 114]]
    with torch.no_grad():
        lp0 = answer_logprobs(chat.model, [base[i // 2] for i in range(4)], answers).logprobs
    groups = [
        [
            Sample(
                g,
                answers[2 * g + k],
                lp0[2 * g + k, : len(answers[2 * g + k])].tolist(),
                "",
                "stop",
                prompt=base[g],
                reward=float(k + g),
            )
            for k in range(2)
        ]
        for g in range(2)
    ]
    params = [p for p in chat.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    train_on_samples(
        chat,
        opt,
        prompts,
        groups,
        None,
        MOPDSettings(alpha=1.0, loss_agg_mode="token-mean", max_grad_norm=1e9),
    )
    mine = [None if p.grad is None else p.grad.clone() for p in params]
    opt.zero_grad(set_to_none=True)
    train_on_groups(
        chat, opt, Collected(groups=groups), GRPOSettings(loss_agg_mode="token-mean", max_grad_norm=1e9)
    )
    n = 0
    for g, p in zip(mine, params, strict=True):
        if g is not None and p.grad is not None:
            assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)
            n += 1
    assert n > 5


# ------------------------------------------------------------------------------------------------ teacher-sampled
def test_teacher_sampled_groups_are_the_teachers_own_and_learnt_by_likelihood(tok):
    """A domain with teacher_sampled 1.0: its groups are what its teacher samples on its own (text) view, re-based
    on the student's prompt; their tokens are learnt by log-likelihood (no distillation, outcome or gate term),
    while the other domain's student samples keep the MOPD loss, in one update."""
    from keye.rl.mopd import teacher_rollouts, teacher_sampled_prompts

    chat = _chat(tok, 3)
    teacher = CheckpointTeacher(_chat(tok, 4), view="text")
    router = TeacherRouter({"grounding": teacher, "caption": teacher})
    settings = MOPDSettings(
        group_size=2, max_new_tokens=5, alpha=0.0, loss_agg_mode="token-sum", max_grad_norm=1e9,
        teacher_sampled={"caption": 1.0},
    )  # fmt: skip
    prompts = [_video_prompt(i, d) for i, d in enumerate(["grounding", "caption", "grounding", "caption"])]
    picked = teacher_sampled_prompts(prompts, router, settings, seed=7)
    assert picked == {1: "caption", 3: "caption"}
    by_teacher = teacher_rollouts(chat, prompts, picked, router, settings, seed=7)
    own = LocalEngine(teacher.chat).rollout(
        [RolloutPrompt(view_messages(prompts[i], "text"), prompts[i].reference) for i in (1, 3)],
        settings.sampling(7),
    )
    for i, g in zip((1, 3), own, strict=True):
        assert [s.token_ids for s in by_teacher[i]] == [s.token_ids for s in g]  # the teacher's own samples
        student_prompt = chat.build_prompt(prompts[i].messages)
        for s in by_teacher[i]:
            assert s.extra["teacher_sampled"] and torch.equal(s.prompt.input_ids, student_prompt.input_ids)
            assert s.prompt.pixel_patches is not None  # the student sees the frames the text teacher did not

    base = {i: chat.build_prompt(prompts[i].messages) for i in (0, 2)}
    mine = {0: [105, 106, 107], 2: [108, 109]}
    with torch.no_grad():
        lp0 = answer_logprobs(chat.model, [base[0], base[2]], [mine[0], mine[2]]).logprobs
    groups = [
        [Sample(0, mine[0], lp0[0, :3].tolist(), "", "stop", prompt=base[0])],
        [s for s in by_teacher[1]],
        [Sample(2, mine[2], lp0[1, :2].tolist(), "", "stop", prompt=base[2])],
        [s for s in by_teacher[3]],
    ]
    for g_i, g in enumerate(groups):
        for s in g:
            s.group = g_i
    params = [p for p in chat.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    m = train_on_samples(chat, opt, prompts, groups, router, settings)
    assert m["caption/teacher_sampled"] == 1.0 and m["grounding/teacher_sampled"] == 0.0
    got = [p.grad.clone() for p in params if p.grad is not None]
    opt.zero_grad()
    samples = [s for g in groups for s in g]
    answers = [s.token_ids for s in samples]
    lp = answer_logprobs(chat.model, [s.prompt for s in samples], answers).logprobs
    on = [i for i, s in enumerate(samples) if not s.extra.get("teacher_sampled")]
    off = [i for i, s in enumerate(samples) if s.extra.get("teacher_sampled")]
    t = teacher.score([prompts[samples[i].group] for i in on], [answers[i] for i in on]).logprobs
    manual = -((t - lp[on, : t.shape[1]].detach()) * lp[on, : t.shape[1]]).sum()
    width = lp.shape[1]
    off_mask = torch.tensor([[1.0] * len(answers[i]) + [0.0] * (width - len(answers[i])) for i in off])
    manual = manual - (lp[off] * off_mask).sum()
    manual.backward()
    want = [p.grad for p in params if p.grad is not None]
    assert len(got) == len(want) > 5
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


def test_teacher_sampled_draws_are_seeded_and_follow_the_share(tok):
    teacher = CheckpointTeacher(_chat(tok, 4))
    router = TeacherRouter({"grounding": teacher, "mcq": teacher})
    settings = MOPDSettings(teacher_sampled={"mcq": 0.5})
    prompts = _text_prompts(400)
    a = teacher_sampled_prompts_of(prompts, router, settings, 3)
    assert a == teacher_sampled_prompts_of(prompts, router, settings, 3)  # seeded
    assert a != teacher_sampled_prompts_of(prompts, router, settings, 4)
    assert set(a.values()) == {"mcq"} and 70 <= len(a) <= 130  # ~half of the 200 mcq prompts
    with pytest.raises(ValueError, match="teacher_sampled shares must lie in"):
        MOPDSettings(teacher_sampled={"mcq": 1.5})


def teacher_sampled_prompts_of(prompts, router, settings, seed):
    from keye.rl.mopd import teacher_sampled_prompts

    return teacher_sampled_prompts(prompts, router, settings, seed)
