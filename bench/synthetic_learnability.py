"""Which of the synthetic set's held-out MCQs can the tiny preset learn from scratch, and how does that depend on the
set's design? (issue 6: the default SFT model must beat chance on the held-out synthetic tasks.)

Videos are the synthetic generator's own specs (keye.datasets.synthetic), rendered straight from the spec at the frame
plan's timestamps (no codec round trip, so hundreds of videos cost seconds), with the set's knobs: --max-objects,
--no-color-changes, and --simplify for the ladder below a real set (one: keep one shape; always: visible the whole
video; static: no motion; nochange: no colour or size change). Training samples are the pipeline's own
(keye.data.samples.build_sample: the benchmark wordings, answers as the option text), drawn at random from the
training videos' MCQs (--kinds keeps some); every --eval-every steps the held-out videos' MCQs are answered greedily
(keye.model.generate, read by the eval's parse_choice) with real frames and with blank ones. One JSON line each.

    python bench/synthetic_learnability.py --max-objects 1 --no-color-changes --steps 150
    python bench/synthetic_learnability.py --kinds color --simplify one,always,static,nochange --steps 50
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from keye.core.config import load_config
from keye.data.loader import collate_pack
from keye.data.samples import (
    MCQ_ANSWER_STRIDE,
    build_sample,
    corpus_texts,
    frame_plan,
    frame_span,
    usable_mcqs,
)
from keye.data.tokenizer import train_bpe
from keye.datasets.synthetic import annotations, dataset_specs, expected_frames, make_spec
from keye.eval.metrics import temporal_iou
from keye.eval.parsing import parse_choice, parse_span
from keye.model import build_model
from keye.model.generate import Prompt, generate
from keye.model.patches import frame_patches as patchify

# the default pipeline's frame plan (pipelines.yaml `sampling`)
POLICY = load_config(Path(__file__).resolve().parents[1] / "pipelines.yaml").sampling


def simplify(specs: list, how: set[str]) -> None:
    for sp in specs:
        if "one" in how:
            sp.objects = sp.objects[:1]
        for o in sp.objects:
            if "always" in how:
                o.t_in, o.t_out = 0.0, sp.duration + 1.0
            if "static" in how:
                o.p1 = o.p0
            if "nochange" in how:
                o.t_change = o.new_color = o.t_resize = None


def _planned_frames(sp, rec: dict, offset: float = 0.0) -> np.ndarray:
    """The frames of a record's plan, rendered from the spec (`offset`: the clip's start in the video)."""
    plan = frame_plan(rec, POLICY)
    idx = [min(sp.n_frames - 1, int((offset + t) * sp.fps + 1e-6)) for t in plan.timestamps]
    x = torch.from_numpy(expected_frames(sp, idx)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(plan.height, plan.width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def render(specs: list) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Sidecar-like records (what a shard record carries) and the planned frames of each video."""
    records, frames = [], {}
    for sp in specs:
        rec: dict[str, Any] = annotations(sp)
        rec.update(
            key=f"{sp.name}-{sp.seed}",
            duration=sp.duration,
            width=sp.width,
            height=sp.height,
            fps=float(sp.fps),
            spec=sp,
        )
        frames[rec["key"]] = _planned_frames(sp, rec)
        records.append(rec)
    return records, frames


def crop(rec: dict, rng: np.random.Generator, min_seconds: float = 3.0) -> tuple[dict, np.ndarray] | None:
    """A random window of a video (a whole number of video frames, >= min_seconds) as its own clip: grounding
    spans shifted and clipped to it (queries less than 0.3 s inside are dropped), frames rendered at its plan."""
    sp = rec["spec"]
    dur = float(rec["duration"])
    length = rng.uniform(min(min_seconds, dur), dur)
    a = round(rng.uniform(0.0, dur - length) * sp.fps) / sp.fps
    n = max(2, min(sp.n_frames - int(round(a * sp.fps)), int(round(length * sp.fps))))
    length = n / sp.fps
    ground = []
    for g in rec["grounding"]:
        s, e = max(g["start"], a) - a, min(g["end"], a + length) - a
        if e - s >= 0.3:
            ground.append({**g, "start": round(s, 3), "end": round(e, 3)})
    if not ground:
        return None
    out = {**rec, "key": f"{rec['key']}@{a:.3f}+{length:.3f}", "duration": length, "grounding": ground}
    return out, _planned_frames(sp, out, offset=a)


def label_frames(rec: dict, item: int) -> dict:
    """The record with grounding item `item` answered as its frames show it (keye.data.samples.frame_span)."""
    plan = frame_plan(rec, POLICY)
    g = rec["grounding"][item]
    s, e = frame_span(g["start"], g["end"], plan.timestamps, float(rec["duration"]))
    ground = list(rec["grounding"])
    ground[item] = {**g, "start": s, "end": e}
    return {**rec, "grounding": ground}


def _prompt(s, fr: np.ndarray) -> Prompt:
    end = int(np.flatnonzero(s.labels != -100)[0])  # the prompt up to the answer
    gh, gw = s.patch_grid()
    return Prompt(
        input_ids=torch.from_numpy(s.input_ids[:end].copy()),
        pixel_patches=torch.from_numpy(patchify(fr)),
        patch_grids=torch.tensor([(1, gh, gw)] * s.frames, dtype=torch.int32),
    )


def score_grounding(model, tok, records, frames, blank: bool, limit: int | None = None) -> dict[str, Any]:
    """Greedy TimeLens answers to the records' grounding queries: mIoU (percent) against the true spans, the
    share of parsable answers and how many distinct answers there are (a constant answer is 1)."""
    model.eval()
    qs = [(r, i) for r in records for i in range(len(r.get("grounding") or []))]
    if limit:
        qs = [qs[j] for j in np.random.default_rng(1).permutation(len(qs))[:limit]]
    prompts = []
    for r, i in qs:
        fr = np.full_like(frames[r["key"]], 128) if blank else frames[r["key"]]
        prompts.append(_prompt(build_sample(tok, r, "grounding", i, POLICY), fr))
    eos = [tok.eos_id, tok.pad_id]
    ious, texts = [], []
    with torch.no_grad():
        for j in range(0, len(prompts), 64):
            outs = generate(model, prompts[j : j + 64], max_new_tokens=24, temperature=0.0, eos_token_ids=eos)
            for (r, i), o in zip(qs[j : j + 64], outs, strict=True):
                text = tok.decode([t for t in o.token_ids if t not in eos]).strip()
                g = r["grounding"][i]
                ious.append(temporal_iou(parse_span(text), (g["start"], g["end"])))
                texts.append(text)
    model.train()
    return {
        "mIoU": round(100.0 * float(np.mean(ious)), 1),
        "distinct": len(set(texts)),
        "n": len(ious),
        "example": texts[0] if texts else "",
    }


def score(
    model, tok, records, frames, blank: bool, limit: int | None = None
) -> tuple[float, dict[str, float], int]:
    """Greedy accuracy (percent) over the records' MCQs, overall and per kind."""
    model.eval()
    qs = [(r, i) for r in records for i in usable_mcqs(r)]
    if limit:
        qs = [qs[j] for j in np.random.default_rng(1).permutation(len(qs))[:limit]]
    prompts = []
    for r, i in qs:
        s = build_sample(tok, r, "mcq", MCQ_ANSWER_STRIDE + i, POLICY)
        fr = np.full_like(frames[r["key"]], 128) if blank else frames[r["key"]]
        prompts.append(_prompt(s, fr))
    eos = [tok.eos_id, tok.pad_id]
    by: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for j in range(0, len(prompts), 64):
            outs = generate(model, prompts[j : j + 64], max_new_tokens=6, temperature=0.0, eos_token_ids=eos)
            for (r, i), o in zip(qs[j : j + 64], outs, strict=True):
                text = tok.decode([t for t in o.token_ids if t not in eos]).strip()
                q = r["mcq"][i]
                right = "ABCDEFGH"[q["answer"]]
                by[str(q.get("kind"))].append(parse_choice(text, len(q["options"]), q["options"]) == right)
    model.train()
    n = sum(len(v) for v in by.values())
    overall = round(100.0 * sum(sum(v) for v in by.values()) / max(1, n), 1)
    return overall, {k: round(100.0 * float(np.mean(v)), 1) for k, v in sorted(by.items())}, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-videos", type=int, default=200)
    ap.add_argument("--heldout-videos", type=int, default=40)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--no-color-changes", action="store_true")
    ap.add_argument("--simplify", default="", help="comma list of one, always, static, nochange")
    ap.add_argument("--kinds", default="", help="comma list: train only on these MCQ kinds (default: all)")
    ap.add_argument(
        "--grounding", type=float, default=0.0, help="share of training samples that are grounding"
    )
    ap.add_argument("--label", choices=("exact", "frames"), default="exact", help="grounding answers: true span "
                    "or the span the frames show (keye.data.samples.frame_span)")  # fmt: skip
    ap.add_argument("--crops", type=float, default=0.0, help="share of grounding samples on a random window")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    kw = {"max_objects": a.max_objects, "color_changes": not a.no_color_changes}
    train_specs = dataset_specs(a.train_videos, 0, seed=11, heldout_fraction=0.0, **kw)
    heldout_specs = [make_spec(i, 12, **kw) for i in range(a.heldout_videos)]
    how = set(a.simplify.split(",")) - {""}
    simplify(train_specs + heldout_specs, how)
    train, frames = render(train_specs)
    heldout, more = render(heldout_specs)
    frames.update(more)
    tok = train_bpe(corpus_texts(train + heldout), vocab_size=2048)
    kinds = set(a.kinds.split(",")) - {""}
    items = [(r, i) for r in train for i in usable_mcqs(r) if not kinds or r["mcq"][i].get("kind") in kinds]
    ground = [(r, i) for r in train for i in range(len(r.get("grounding") or []))]
    if not items and a.grounding < 1.0:
        raise SystemExit(
            f"no training MCQs of kinds {sorted(kinds)} in this set (one shape asks no color_presence)"
        )
    model = build_model("tiny", vocab_size=len(tok), image_token_id=tok.image_id, seed=a.seed).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(a.seed)

    def grounding_sample() -> tuple[Any, np.ndarray]:
        while True:
            r, i = ground[int(rng.integers(len(ground)))]
            fr = frames[r["key"]]
            if rng.random() < a.crops:
                view = crop(r, rng)
                if view is None:
                    continue
                r, fr = view
                i = int(rng.integers(len(r["grounding"])))
            if a.label == "frames":
                r = label_frames(r, i)
            return build_sample(tok, r, "grounding", i, POLICY), fr

    for step in range(1, a.steps + 1):
        batch, batch_frames = [], []
        for _ in range(a.batch):
            if rng.random() < a.grounding:
                smp, fr = grounding_sample()
            else:
                r, i = items[int(rng.integers(len(items)))]
                smp, fr = build_sample(tok, r, "mcq", MCQ_ANSWER_STRIDE + i, POLICY), frames[r["key"]]
            batch.append(smp)
            batch_frames.append(fr)
        inputs = collate_pack(batch, batch_frames)
        out = model(**{k: v.to(a.device) for k, v in inputs.items()})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            row: dict[str, Any] = {"step": step, "loss": round(float(out.lm_loss.detach()), 3)}
            if a.grounding < 1.0:
                real, real_kinds, n = score(model, tok, heldout, frames, blank=False)
                blank, blank_kinds, _ = score(model, tok, heldout, frames, blank=True)
                train_acc, _, _ = score(model, tok, train, frames, blank=False, limit=200)
                row.update(heldout=real, blank=blank, by_kind=real_kinds, blank_by_kind=blank_kinds,
                           n_heldout=n, train=train_acc)  # fmt: skip
            if a.grounding > 0.0:
                row["ground_heldout"] = score_grounding(model, tok, heldout, frames, blank=False)
                row["ground_blank"] = score_grounding(model, tok, heldout, frames, blank=True)["mIoU"]
                row["ground_train"] = score_grounding(model, tok, train, frames, blank=False, limit=100)[
                    "mIoU"
                ]
            row.update(
                simplify=sorted(how), max_objects=a.max_objects, color_changes=not a.no_color_changes,
                kinds=sorted(kinds), grounding=a.grounding, label=a.label, crops=a.crops,
                train_videos=a.train_videos, s=round(time.time() - t0, 1),
            )  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
