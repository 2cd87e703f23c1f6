"""Student tokens/s through one MOPD update with two teachers (keye.rl.mopd.train_on_samples: teacher scoring +
student forward/backward + optimizer step) on the `small` preset, the share of that time spent scoring with the
teachers, and an SFT step (cross-entropy forward/backward + step) on the very same tokens as the baseline.

Random-weight models (speed does not depend on the values); prompts are frames + text as a video question is,
answers are sampled token ids (no generation is timed: rollouts are bench/rollout.py's business).

  python bench/mopd.py --prompts 16 --group 4 --answer 256 --frames 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from keye.model import build_model
from keye.model.generate import Prompt
from keye.rl.mopd import MOPDSettings, train_on_samples
from keye.rl.policy import answer_logprobs
from keye.rl.rollouts import RolloutPrompt, Sample
from keye.rl.teachers import TeacherRouter, TeacherScores


class PromptTeacher:
    """A frozen model scoring the prompts' prebuilt model inputs (the bench skips the chat template)."""

    def __init__(self, model, inputs, name):
        self.model, self.inputs, self.name, self.view = (
            model.eval().requires_grad_(False),
            inputs,
            name,
            "video",
        )

    def score(self, prompts, answers, *, temperature=1.0, full=False):
        with torch.no_grad():
            s = answer_logprobs(
                self.model, [self.inputs[p.id] for p in prompts], answers, temperature, False, full
            )
        return TeacherScores(s.logprobs.float().cpu(), s.mask.cpu(), None)


class Chat:
    def __init__(self, model):
        self.model = model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--answer", type=int, default=256, help="tokens per answer")
    ap.add_argument("--text", type=int, default=128, help="text tokens per prompt")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--frame-side", type=int, default=224, help="pixels; 224 -> 64 tokens per frame")
    ap.add_argument("--micro", type=int, default=16, help="samples per forward/backward")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    vocab, image_id = 151936, 151655
    student = build_model(
        args.preset, vocab_size=vocab, image_token_id=image_id, device=dev, dtype=dtype, seed=0
    )
    teachers = [
        build_model(args.preset, vocab_size=vocab, image_token_id=image_id, device=dev, dtype=dtype, seed=s)
        for s in (1, 2)
    ]
    v = student.config.vision
    merge, patch = v.spatial_merge, v.patch_size
    g = args.frame_side // patch
    tokens_per_frame = (g // merge) ** 2
    gen = torch.Generator().manual_seed(0)
    inputs, prompts, samples = {}, [], []
    for i in range(args.prompts):
        ids = torch.randint(0, 150000, (args.text,), generator=gen)
        ids = torch.cat([ids[:8], torch.full((tokens_per_frame * args.frames,), image_id), ids[8:]])
        grids = torch.tensor([[1, g, g]] * args.frames, dtype=torch.int32)
        pix = torch.randn(args.frames * g * g, 3 * patch * patch, generator=gen).to(dtype)
        inputs[f"p{i}"] = Prompt(input_ids=ids, pixel_patches=pix, patch_grids=grids)
        prompts.append(RolloutPrompt([], {"domain": "grounding" if i % 2 == 0 else "mcq"}, f"p{i}"))
        for _ in range(args.group):
            ans = torch.randint(0, 150000, (args.answer,), generator=gen).tolist()
            samples.append(
                Sample(
                    i,
                    ans,
                    [0.0] * args.answer,
                    "",
                    "stop",
                    prompt=inputs[f"p{i}"],
                    reward=float(torch.rand(1, generator=gen)),
                )
            )
    with torch.no_grad():  # sampler log-probs = the student's, as an on-policy rollout gives
        for a in range(0, len(samples), args.micro):
            chunk = samples[a : a + args.micro]
            lp = answer_logprobs(
                student, [s.prompt for s in chunk], [s.token_ids for s in chunk], with_entropy=False
            )
            for s, row in zip(chunk, lp.logprobs.float().cpu(), strict=True):
                s.logprobs = row[: len(s.token_ids)].tolist()
    groups = [[s for s in samples if s.group == i] for i in range(args.prompts)]
    router = TeacherRouter(
        {
            "grounding": PromptTeacher(teachers[0], inputs, "t0"),
            "mcq": PromptTeacher(teachers[1], inputs, "t1"),
        }
    )
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-7)
    settings = MOPDSettings(group_size=args.group, micro_batch_size=args.micro, loss_agg_mode="token-mean")
    n_tok = len(samples) * args.answer
    n_all = sum(len(s.prompt.input_ids) + args.answer for s in samples)

    def sft_step():
        opt.zero_grad(set_to_none=True)
        for a in range(0, len(samples), args.micro):
            chunk = samples[a : a + args.micro]
            lp = answer_logprobs(
                student, [s.prompt for s in chunk], [s.token_ids for s in chunk], with_entropy=False
            )
            (-(lp.logprobs * lp.mask).sum() / n_tok).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    rows = []
    for r in range(args.repeats + 1):  # the first of each is a warm-up
        sync()
        t0 = time.perf_counter()
        m = train_on_samples(Chat(student), opt, prompts, groups, router, settings)
        sync()
        mopd_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sft_step()
        sync()
        sft_s = time.perf_counter() - t0
        if r:
            rows.append({"mopd_s": mopd_s, "teacher_s": m["teacher_seconds"], "sft_s": sft_s})
    mopd_s = sorted(x["mopd_s"] for x in rows)[len(rows) // 2]
    teacher_s = sorted(x["teacher_s"] for x in rows)[len(rows) // 2]
    sft_s = sorted(x["sft_s"] for x in rows)[len(rows) // 2]
    out = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "args": vars(args),
        "student_answer_tokens": n_tok,
        "tokens_per_update_incl_prompts": n_all,
        "mopd_step_s": mopd_s,
        "mopd_student_tokens_per_s": n_tok / mopd_s,
        "teacher_share": teacher_s / mopd_s,
        "sft_step_s": sft_s,
        "sft_tokens_per_s": n_tok / sft_s,
        "mopd_over_sft_time": mopd_s / sft_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
        "runs": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
