"""What a grounding answer can score on the synthetic set's held-out queries without a model: a span proportional to
the video's length (the best of a grid: what a model that ignores the pixels can reach) and answers made from the
default frame plan (the bracket of keye.data.grounding_items.frame_span, the onset/offset frames, the first and
last frames that show the event, and the midpoints between the bracketing frames). Issue 17 item 7: a grounding task
is worth training only when reading the frames beats the length prior.

    python bench/grounding_oracles.py --videos 400
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from keye.core.config import load_config
from keye.data.grounding_items import frame_span
from keye.data.sampling import plan_frames
from keye.datasets.synthetic import annotations, make_spec
from keye.eval.metrics import temporal_iou

POLICY = load_config(
    Path(__file__).resolve().parents[1] / "pipelines.yaml"
).sampling  # the default frame plan


def answers(start: float, end: float, ts: list[float], duration: float) -> dict[str, tuple[float, float]]:
    lo, hi = frame_span(start, end, ts, duration)
    first = next((i for i, t in enumerate(ts) if t >= start - 1e-6), len(ts) - 1)
    last = max(first, max((i for i, t in enumerate(ts) if t < end - 1e-6), default=first))
    after = ts[last + 1] if last + 1 < len(ts) else duration
    return {
        "bracket": (lo, hi),
        "onset_offset": (ts[first], after),
        "first_last_shown": (ts[first], ts[last]),
        "midpoints": ((lo + ts[first]) / 2, (ts[last] + hi) / 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=400)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--with-cuts", action="store_true", help="keep the 'background changes' queries")
    a = ap.parse_args()
    qs = []
    for i in range(a.videos):
        sp = make_spec(i, a.seed, max_objects=1, color_changes=False)
        plan = plan_frames(sp.duration, sp.width, sp.height, POLICY, video_fps=sp.fps)
        for g in annotations(sp)["grounding"]:
            if a.with_cuts or not g["query"].startswith("the background"):
                qs.append((g["start"], g["end"], sp.duration, list(plan.timestamps)))
    prior = max(
        (float(np.mean([temporal_iou((lo * T, hi * T), (s, e)) for s, e, T, _ in qs])), lo, hi)
        for lo in np.arange(0.0, 0.6, 0.05)
        for hi in np.arange(0.1, 1.0001, 0.05)
        if hi > lo
    )
    row = {
        "queries": len(qs),
        "length_prior": {"mIoU": round(100 * prior[0], 1), "span": [prior[1], prior[2]]},
    }
    for name in ("bracket", "onset_offset", "first_last_shown", "midpoints"):
        ious = [temporal_iou(answers(s, e, ts, T)[name], (s, e)) for s, e, T, ts in qs]
        row[name] = round(100 * float(np.mean(ious)), 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
