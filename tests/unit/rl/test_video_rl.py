"""The Video-RL training loop (keye.rl.video_rl) on annotated synthetic videos and a tiny random-weight checkpoint:
prompts asked exactly as the eval asks them, a seeded prompt order, per-task rewards, a final/ that loads like any
trained checkpoint, and a resume after an interruption that continues bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.datasets.synthetic.dataset import generate_dataset
from keye.model import build_model, save_checkpoint
from keye.rl.grpo import GRPOSettings
from keye.rl.prompt_sets import split_prompts
from keye.rl.rewards import register_reward
from keye.rl.rollouts import RolloutPrompt
from keye.rl.video_rl import PromptCursor, VideoRLSchedule, task_reward, train_video_rl

POLICY = SamplingPolicy(
    fps=1.0,
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
def videos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("rlvideos")
    return generate_dataset(d, n_videos=6, n_long=0, seed=5, heldout_fraction=0.34, workers=1, max_objects=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rlckpt")
    tok = train_bpe(
        ["The event happens in 1.0 - 2.5 seconds. a red circle is visible. 0123456789"] * 10, 400, 1
    )
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=0)
    ckpt = save_checkpoint(model, d / "sft")
    tok.save(ckpt)
    (ckpt / "sampling_policy.json").write_text(POLICY.model_dump_json())
    return ckpt


def test_prompts_are_the_eval_prompts_of_the_training_split(videos, checkpoint, tmp_path, monkeypatch):
    from keye.eval.readers import read_benchmark
    from keye.serve.chat import ChatModel

    prompts = split_prompts(videos, tmp_path / "p", "train", kinds=("timelens", "videomme"))
    train = {v.stem for v in videos if json.loads(v.with_suffix(".json").read_text())["split"] == "train"}
    assert prompts and {Path(p.messages[-1]["content"][0]["video_url"]["url"]).stem for p in prompts} <= train
    kinds = {p.reference["kind"] for p in prompts}
    assert kinds == {"timelens", "videomme"}
    g = next(p for p in prompts if p.reference["kind"] == "timelens")
    assert g.reference["duration"] > 0 and len(g.reference["span"]) == 2
    # the same token ids as keye eval's prompt for the same question (one template, one frame sampler)
    from keye.eval.predict import keye_predict_fn

    bench = read_benchmark(
        next((tmp_path / "p").glob("set0/timelens/*.json")), videos[0].parent, kind="timelens"
    )
    q = next(q for q in bench.questions if f"timelens/{q.id}" == g.id)
    chat = ChatModel.from_checkpoint(checkpoint)
    ours = chat.build_prompt(g.messages)
    captured = {}
    import keye.model.generate as gen

    real = gen.generate

    def spy(model, prompts_, **kw):  # records the eval's real model input, then generates as usual
        captured["ids"] = prompts_[0].input_ids.clone()
        captured["patches"] = prompts_[0].pixel_patches.clone()
        return real(model, prompts_, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    keye_predict_fn(checkpoint)([q])
    assert torch.equal(ours.input_ids, captured["ids"])
    assert torch.equal(ours.pixel_patches, captured["patches"])
    with pytest.raises(ValueError, match="unknown RL task kind"):
        split_prompts(videos, tmp_path / "q", "train", kinds=("nope",))


def test_window_prompts_show_a_window_as_its_own_clip_with_the_span_moved_into_it(
    videos, checkpoint, tmp_path
):
    from keye.serve.chat import ChatModel

    whole = split_prompts(videos, tmp_path / "p", "train")
    prompts = split_prompts(videos, tmp_path / "w", "train", grounding_windows=3)
    windows = [p for p in prompts if "@w" in p.id]
    assert [p for p in prompts if "@w" not in p.id] == whole and windows
    assert len(prompts) == len(split_prompts(videos, tmp_path / "w2", "train", grounding_windows=3))  # stable
    chat = ChatModel.from_checkpoint(checkpoint)
    for p in windows:
        base = next(b for b in whole if p.id.startswith(b.id + "@w"))
        part = p.messages[-1]["content"][0]["video_url"]
        a, e = part["start"], part["end"]
        length = p.reference["duration"]
        assert part["timestamps"] == "relative" and e - a == pytest.approx(length) and length >= 3.0 - 1e-6
        s0, e0 = base.reference["span"]
        s1, e1 = p.reference["span"]
        assert s1 == pytest.approx(max(s0, a) - a, abs=1e-3) and e1 == pytest.approx(min(e0, e) - a, abs=1e-3)
        assert 0 <= s1 < e1 <= length + 1e-6
    # the frames are stamped from 0: the same window asked with absolute stamps renders other timestamps
    p = windows[0]
    rel = chat.encode(p.messages)[0]
    absolute = json.loads(json.dumps(p.messages))
    absolute[-1]["content"][0]["video_url"]["timestamps"] = "absolute"
    ab = chat.encode(absolute)[0]
    assert torch.equal(rel.pixel_patches, ab.pixel_patches)
    if p.messages[-1]["content"][0]["video_url"]["start"] > 0:
        assert not torch.equal(rel.input_ids, ab.input_ids)
    bad = json.loads(json.dumps(p.messages))
    bad[-1]["content"][0]["video_url"]["timestamps"] = "local"
    from keye.serve.chat import ChatRequestError

    with pytest.raises(ChatRequestError, match="timestamps must be 'absolute' or 'relative'"):
        chat.encode(bad)


def test_prompt_cursor_is_a_seeded_permutation_per_epoch_that_resumes():
    prompts = [RolloutPrompt([], {}, str(i)) for i in range(5)]
    a = PromptCursor(prompts, seed=3)
    first = [p.id for p in a.take(5)]
    assert sorted(first) == ["0", "1", "2", "3", "4"]  # one epoch: every prompt once
    rest = [p.id for p in a.take(4)]
    b = PromptCursor(prompts, seed=3, position=5)
    assert [p.id for p in b.take(4)] == rest


def test_task_reward_routes_by_kind_and_names_a_missing_one():
    reward = task_reward({"timelens": {"time_r1_iou": 1.0}, "videomme": {"mcq": 1.0}})
    ref = {"kind": "timelens", "span": [1.0, 2.0], "duration": 4.0}
    assert reward("The event happens in 1.0 - 2.0 seconds", ref) == pytest.approx(1.0)
    assert reward("B", {"kind": "videomme", "answer": "B", "options": ["x", "y", "z", "w"]}) == 1.0
    with pytest.raises(KeyError, match="no reward configured for task 'longvideobench'"):
        reward("A", {"kind": "longvideobench", "answer": "A"})


@register_reward("test_digit_share")
def digit_share(completion, reference):
    """A reward a random-weight policy already varies on (the task's own reward is 0 for random text)."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def _run(checkpoint, prompts, out, steps, log, freeze_vision=True):
    grpo = GRPOSettings(group_size=4, max_new_tokens=6, temperature=1.0, filter_groups=False)
    schedule = VideoRLSchedule(
        steps=steps,
        lr=1e-3,
        prompts_per_step=2,
        save_every=1,
        keep_last=3,
        seed=1,
        freeze_vision=freeze_vision,
    )
    return train_video_rl(
        checkpoint, prompts, out, schedule, grpo, {"timelens": {"test_digit_share": 1.0}}, log_metrics=log
    )


def test_train_resumes_bit_for_bit_and_exports_a_loadable_checkpoint(videos, checkpoint, tmp_path):
    from keye.model import load_checkpoint
    from keye.model.checkpoint import read_state

    prompts = split_prompts(videos, tmp_path / "p", "train")
    straight: dict[int, dict] = {}
    res = _run(checkpoint, prompts, tmp_path / "a", 3, lambda m, s: straight.setdefault(s, m))
    assert res.steps == 3 and (res.checkpoint_dir / "tokenizer.json").is_file()
    saved = (res.checkpoint_dir / "sampling_policy.json").read_text()
    assert SamplingPolicy.model_validate_json(saved) == POLICY
    load_checkpoint(res.checkpoint_dir)  # checksums and weights as every trained checkpoint
    # the same run interrupted after step 2 (its step-3 checkpoint and final/ gone), then started again
    resumed: dict[int, dict] = {}
    _run(checkpoint, prompts, tmp_path / "b", 2, lambda m, s: resumed.setdefault(s, m))
    import shutil

    shutil.rmtree(tmp_path / "b" / "final")
    again = _run(checkpoint, prompts, tmp_path / "b", 3, lambda m, s: resumed.setdefault(s, m))
    assert sorted(resumed) == [1, 2, 3]
    for k in ("reward_mean", "loss", "entropy", "response_length"):
        assert resumed[3][k] == straight[3][k], k
    a, b = read_state(res.checkpoint_dir), read_state(again.checkpoint_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = read_state(checkpoint)
    assert any(not torch.equal(a[k], base[k]) for k in a if k.startswith("lm."))  # the policy moved
    assert all(torch.equal(a[k], base[k]) for k in a if k.startswith(("vision.", "projector.")))  # frozen
    # a finished run returns at once
    done = _run(checkpoint, prompts, tmp_path / "a", 3, lambda m, s: pytest.fail("trained again"))
    assert done.steps == 3


def test_freeze_vision_off_trains_the_vit_and_projector_too(videos, checkpoint, tmp_path):
    from keye.model.checkpoint import read_state

    prompts = split_prompts(videos, tmp_path / "p", "train")
    res = _run(checkpoint, prompts, tmp_path / "u", 3, None, freeze_vision=False)
    a, base = read_state(res.checkpoint_dir), read_state(checkpoint)
    for part in ("vision.", "projector.", "lm."):
        assert any(not torch.equal(a[k], base[k]) for k in a if k.startswith(part)), part
