"""How fast does the tiny preset, trained from scratch on CPU, learn to answer a frame-dependent multiple-choice
question, by answer format? (issue 6: the default SFT model does not beat chance on held-out MCQs.)

Each sample: a few frames with one coloured shape over a noisy background, the Video-MME wording of "What colour is
the shape?" with 4 of the 6 synthetic colours as options, and the answer as the letter or as the option's text
(keye.data.prompts.mcq_answer). Every training batch is fresh samples (or draws from a fixed pool, --pool), so the
held-out accuracy measures what generalises. Greedy answers go through the eval's parse_choice, with the real frames
and with blank frames (what the model guesses without vision). One JSON line per evaluation.

    python bench/mcq_learnability.py --answer option --steps 100
    python bench/mcq_learnability.py --answer letter --steps 300
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from keye.data.prompts import SYSTEM_PROMPT, mcq_answer, mcq_prompt
from keye.data.tokenizer import encode_chat, train_bpe
from keye.datasets.synthetic import COLORS, SHAPES, shape_mask
from keye.eval.parsing import parse_choice
from keye.model import build_model
from keye.model.generate import Prompt, generate
from keye.model.patches import frame_patches as patchify
from keye.model.rope import mrope_positions
from keye.model.vision_tokens import PATCH

NAMES = list(COLORS)
QUESTION = (
    "What colour is the shape?"  # with --shapes N > 1: "What colour is the <shape>?" about one of N shapes
)


def make_sample(rng: np.random.Generator, a: argparse.Namespace, n_shapes: int | None = None) -> dict:
    n_shapes = n_shapes or a.shapes
    size = a.size
    if a.background == "grey":
        bg = np.full(3, rng.integers(40, 200), np.float32)
    else:
        bg = rng.integers(30, 200, size=3).astype(np.float32)
    frames = bg + rng.normal(0, 8, size=(a.frames, size, size, 3)).astype(np.float32)
    r = max(3, int(a.radius * size))
    shapes = [str(x) for x in rng.permutation(SHAPES)[:n_shapes]]
    colours = [int(x) for x in rng.permutation(len(NAMES))[:n_shapes]]
    cells = rng.permutation(4)[:n_shapes]  # one quadrant each, so shapes never overlap
    half = size // 2
    for shape, colour, cell in zip(shapes, colours, cells, strict=True):
        mask = shape_mask(shape, r) if a.shapes > 1 else shape_mask("circle", r)  # one-shape bench: a disc
        cy = (cell // 2) * half + int(rng.integers(r, half - r))
        cx = (cell % 2) * half + int(rng.integers(r, half - r))
        frames[:, cy - r : cy + r + 1, cx - r : cx + r + 1][:, mask] = COLORS[NAMES[colour]]
    c = colours[0]
    others = [k for k in range(len(NAMES)) if k != c]
    rng.shuffle(others)
    opts = [c, *others[:3]]
    rng.shuffle(opts)
    return {
        "frames": np.clip(frames, 0, 255).astype(np.uint8),
        "options": [NAMES[k] for k in opts],
        "answer": opts.index(c),
        "question": QUESTION if a.shapes == 1 else f"What colour is the {shapes[0]}?",
    }


def messages(s: dict, a: argparse.Namespace, with_answer: bool) -> list[dict]:
    grid = (a.size // PATCH // 2) ** 2
    video = {"type": "video", "frames": [{"time": float(t), "tokens": grid} for t in range(a.frames)]}
    msgs = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [video, {"type": "text", "text": mcq_prompt("videomme", s["question"], s["options"])}],
        },
    ]
    if with_answer:
        msgs.append({"role": "assistant", "content": mcq_answer(s["options"], s["answer"], a.answer)})
    return msgs


def inputs(tok, items: list[tuple[Any, np.ndarray]], a: argparse.Namespace) -> dict:
    """Packed training inputs from (encoded chat, frames) pairs, in the loader's layout (keye.model.patches.frame_patches)."""
    g = a.size // PATCH
    ids = [torch.from_numpy(e.ids.astype(np.int64)) for e, _ in items]
    n = len(items) * a.frames
    return {
        "input_ids": torch.cat(ids),
        "labels": torch.from_numpy(np.concatenate([e.labels for e, _ in items]).astype(np.int64)),
        "position_ids": torch.cat(
            [mrope_positions(t, tok.image_id, [(g // 2, g // 2)] * a.frames) for t in ids], 1
        ),
        "cu_seqlens": torch.tensor(np.cumsum([0] + [len(t) for t in ids]), dtype=torch.int32),
        "pixel_patches": torch.from_numpy(np.concatenate([patchify(fr) for _, fr in items])),
        "patch_grids": torch.tensor([(1, g, g)] * n, dtype=torch.int32),
        "vision_cu_seqlens": torch.arange(0, n * g * g + 1, g * g, dtype=torch.int32),
    }


def greedy_accuracy(
    model, tok, test: list[dict], a: argparse.Namespace, blank: bool
) -> tuple[float, list[str]]:
    """Greedy answers as the eval makes them (keye.model.generate, stopping at end of turn), read by parse_choice."""
    g = a.size // PATCH
    prompts = [
        Prompt(
            input_ids=encode_chat(tok, messages(s, a, False), add_generation_prompt=True).ids.astype(
                np.int64
            ),
            pixel_patches=torch.from_numpy(patchify(np.zeros_like(s["frames"]) if blank else s["frames"])),
            patch_grids=torch.tensor([(1, g, g)] * a.frames, dtype=torch.int32),
        )
        for s in test
    ]
    eos = [tok.eos_id, tok.pad_id]
    results = generate(model, prompts, max_new_tokens=a.max_new_tokens, temperature=0.0, eos_token_ids=eos)
    texts = [tok.decode([t for t in r.token_ids if t not in eos]).strip() for r in results]
    right = [
        parse_choice(t, 4, s["options"]) == "ABCD"[s["answer"]] for t, s in zip(texts, test, strict=True)
    ]
    return round(100.0 * float(np.mean(right)), 1), texts[:4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answer", choices=["letter", "option"], default="option")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="samples per optimizer step")
    ap.add_argument(
        "--pool", type=int, default=0, help="draw training samples from this many fixed ones (0: fresh)"
    )
    ap.add_argument("--size", type=int, default=112, help="frame side in pixels (a multiple of 28)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--radius", type=float, default=0.1, help="shape radius as a fraction of the frame side")
    ap.add_argument(
        "--shapes", type=int, default=1, choices=[1, 2, 3, 4], help="shapes per sample (>1: ask about one)"
    )
    ap.add_argument(
        "--train-shapes", default="", help="comma list: each training sample's shape count is drawn from it"
    )
    ap.add_argument("--background", choices=["grey", "colour"], default="colour")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--test", type=int, default=60, help="held-out samples")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    test = [make_sample(rng, a) for _ in range(a.test)]
    pool = [make_sample(rng, a) for _ in range(a.pool)]
    texts = (
        [mcq_prompt("videomme", QUESTION, NAMES[i : i + 4]) for i in range(3)] + NAMES + [SYSTEM_PROMPT] * 3
    )
    tok = train_bpe(texts * 4, vocab_size=512)
    model = build_model("tiny", vocab_size=len(tok), image_token_id=tok.image_id, seed=a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        counts = [int(x) for x in a.train_shapes.split(",")] if a.train_shapes else [a.shapes]
        if pool:
            batch = [pool[int(rng.integers(a.pool))] for _ in range(a.batch)]
        elif len(counts) == 1:
            batch = [make_sample(rng, a, counts[0]) for _ in range(a.batch)]
        else:
            batch = [make_sample(rng, a, counts[int(rng.integers(len(counts)))]) for _ in range(a.batch)]
        items = [(encode_chat(tok, messages(s, a, True)), s["frames"]) for s in batch]
        out = model(**inputs(tok, items, a))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            real, said = greedy_accuracy(model, tok, test, a, blank=False)
            blank, _ = greedy_accuracy(model, tok, test, a, blank=True)
            model.train()
            row = {
                "answer": a.answer, "shapes": a.shapes, "step": step, "loss": round(float(out.lm_loss.detach()), 4),
                "acc_real": real, "acc_blank": blank, "chance": 25.0, "said": said, "s": round(time.time() - t0, 1),
            }  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
