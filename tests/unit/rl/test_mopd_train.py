"""MOPD training on real synthetic videos and tiny checkpoints: the domain-tagged prompt set of the training split
(grounding, MCQ, captioning; transcripts from the sidecars), per-domain metrics with a video teacher and a text
teacher, and exact resume of train_mopd from a step checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.datasets.synthetic.dataset import generate_dataset
from keye.model import build_model, save_checkpoint
from keye.model.checkpoint import read_state
from keye.rl.mopd import MOPDSettings
from keye.rl.mopd_prompts import domain_prompts, sidecar_transcript, tag_domains
from keye.rl.mopd_train import MOPDSchedule, TeacherSpec, train_mopd
from keye.rl.rewards import caption_f1
from keye.rl.rollouts import RolloutPrompt

POLICY = SamplingPolicy(
    fps=1.0,
    min_frames=2,
    max_frames=2,
    min_tokens_per_frame=4,
    max_tokens_per_frame=8,
    total_token_budget=16,
    duration_scaling=False,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("mopd")
    videos = generate_dataset(d / "videos", n_videos=3, n_long=0, seed=3, heldout_fraction=0.0, workers=1)
    texts = [json.dumps(json.loads(v.with_suffix(".json").read_text())) for v in videos]
    tok = train_bpe(texts * 3, 400, 1)
    ckpts = {}
    for name, seed in (("student", 0), ("grounding", 1), ("mcq", 2), ("caption", 3)):
        model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=seed)
        c = save_checkpoint(model, d / name)
        tok.save(c)
        (c / "sampling_policy.json").write_text(POLICY.model_dump_json())
        ckpts[name] = c
    prompts = domain_prompts(videos, d / "prompts", "train")
    return d, videos, ckpts, prompts


def test_prompt_set_has_every_domain_with_transcripts(world):
    _, videos, _, prompts = world
    domains = {p.reference["domain"] for p in prompts}
    assert domains == {"grounding", "mcq", "caption"}
    for p in prompts:
        video = p.messages[-1]["content"][0]["video_url"]["url"]
        assert p.reference["transcript"] == sidecar_transcript(video)
        assert p.messages[0] == {
            "role": "system",
            "content": "You are Keye, a helpful assistant that understands videos.",
        }
    ann = json.loads(videos[0].with_suffix(".json").read_text())
    assert ann["caption"] in sidecar_transcript(videos[0])
    cap = next(p for p in prompts if p.reference["domain"] == "caption")
    assert caption_f1(cap.reference["caption"], cap.reference) == pytest.approx(1.0)
    assert caption_f1("", cap.reference) == 0.0
    with pytest.raises(KeyError, match="'ocr'"):
        tag_domains([RolloutPrompt([{"role": "user", "content": "x"}], {"kind": "ocr"}, "x")])


def _train(world, out, steps, prompts=None, teacher_sampled=None):
    d, _, ckpts, all_prompts = world
    teachers = {
        "grounding": TeacherSpec(checkpoint=str(ckpts["grounding"])),
        "mcq": TeacherSpec(checkpoint=str(ckpts["mcq"])),
        "caption": TeacherSpec(checkpoint=str(ckpts["caption"]), view="text"),
    }
    logged = []
    result = train_mopd(
        ckpts["student"],
        teachers,
        prompts or all_prompts,
        out,
        MOPDSchedule(steps=steps, lr=1e-3, prompts_per_step=3, save_every=1, seed=7),
        MOPDSettings(
            group_size=2,
            max_new_tokens=4,
            domains=("caption", "grounding", "mcq"),
            teacher_sampled=teacher_sampled or {},
        ),  # fmt: skip
        {"grounding": "time_r1", "mcq": "mcq", "caption": "caption_f1"},
        log_metrics=lambda m, s: logged.append((s, m)),
    )
    return result, logged


@pytest.mark.parametrize("teacher_sampled", [None, {"caption": 1.0, "mcq": 0.5}], ids=["on-policy", "mixed"])
def test_train_mopd_logs_per_domain_curves_and_resumes_exactly(world, teacher_sampled):
    d = world[0] / ("mixed" if teacher_sampled else "on")
    few = None
    if teacher_sampled:  # each domain's first two prompts: every step meets a caption prompt
        by = {
            dom: [p for p in world[3] if p.reference["domain"] == dom][:2]
            for dom in ("caption", "grounding", "mcq")
        }
        few = [p for ps in by.values() for p in ps]
    straight, logged = _train(world, d / "straight", 3, few, teacher_sampled)
    assert straight.steps == 3 and (straight.checkpoint_dir / "tokenizer.json").is_file()
    assert [s for s, _ in logged] == [1, 2, 3]
    for _, m in logged:
        for dom in ("grounding", "mcq", "caption"):
            assert {f"{dom}/reverse_kl", f"{dom}/reward", f"{dom}/response_length"} <= set(m)
    if teacher_sampled:  # the caption teacher (text view) sampled every caption group; grounding: the student
        shown = [m for _, m in logged if m.get("caption/samples", 0) > 0]
        assert shown and all(m["caption/teacher_sampled"] == 1.0 for m in shown)
        assert all(m.get("grounding/teacher_sampled", 0.0) == 0.0 for _, m in logged)
    first, _ = _train(world, d / "resumed", 2, few, teacher_sampled)
    assert first.steps == 2
    resumed, relogged = _train(world, d / "resumed", 3, few, teacher_sampled)
    assert [s for s, _ in relogged] == [3]  # only the missing step ran
    assert resumed.metrics == straight.metrics
    a, b = read_state(straight.checkpoint_dir), read_state(resumed.checkpoint_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again, none = _train(world, d / "straight", 3, few, teacher_sampled)  # finished: returns at once
    assert none == [] and again.metrics == straight.metrics


def test_a_teacher_that_cannot_sample_fails_before_any_work(world, tmp_path):
    """teacher_sampled names a domain whose teacher only scores (an endpoint): a clear error before any work."""
    _, _, ckpts, prompts = world

    class ScoresOnly:  # an endpoint teacher's surface: a name, a view and score(); no local model to sample
        name, view = "remote", "video"

        def score(self, prompts, answers, *, temperature=1.0, full=False):  # pragma: no cover - never reached
            raise AssertionError("no work may start")

    caption = [p for p in prompts if p.reference["domain"] == "caption"]
    with pytest.raises(ValueError, match="mopd.teacher_sampled.caption: needs the domain's teacher"):
        train_mopd(
            ckpts["student"], {"caption": ScoresOnly()}, caption, tmp_path / "out", MOPDSchedule(steps=1),
            MOPDSettings(teacher_sampled={"caption": 1.0}), {"caption": "caption_f1"},
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
