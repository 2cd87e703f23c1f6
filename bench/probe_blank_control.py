"""The blank-frame control on the eval's grounding probe, for a post-trained checkpoint and the one it started from:
each checkpoint's real vs blank frames, and the two checkpoints compared with blank frames. Why: the eval stage's
control covers the set's own held-out questions only (the probe's would cost ~30 s of the default pipeline's
12-minute budget); this is the same control on the probe, run on a finished workspace.

  python bench/probe_blank_control.py --workspace WS --base WS/checkpoints/<sft>/final \\
      --new WS/checkpoints/<rl>/final --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--base", required=True, help="the checkpoint post-training started from")
    ap.add_argument("--new", required=True, help="the post-trained checkpoint")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()

    from keye.data.frame_cache import FrameCache
    from keye.eval import keye_predict_fn
    from keye.eval.export import write_heldout_benchmarks
    from keye.eval.heldout import BenchSet, paired_grounding, run_benchmarks

    probes = sorted((a.workspace / "videos").glob("*-probe*"))
    if len(probes) != 1:
        raise SystemExit(f"{a.workspace}/videos: expected one grounding probe folder, found {probes}")
    probe = probes[0]
    files = write_heldout_benchmarks(sorted(probe.glob("*.json")), probe, a.out / "bench", split="heldout")
    sets = [BenchSet(probe, {"timelens": files["timelens"]}, suffix="_probe")]
    cache, res, t0 = FrameCache(512 << 20), {}, time.time()
    for name, ck in (("base", a.base), ("new", a.new)):
        fn = keye_predict_fn(ck, max_new_tokens=24, frames_cache=cache)
        res[name] = run_benchmarks(fn, sets, a.out / name / "real", a.batch_size, None)
        blank = run_benchmarks(
            lambda q, fn=fn: fn(q, blank_frames=True), sets, a.out / name / "blank", a.batch_size, None
        )
        res[f"{name}_blank"] = blank
    rows = {"probe": str(probe), "seconds": round(time.time() - t0, 1)}
    for new, base in (
        ("base", "base_blank"),
        ("new", "new_blank"),
        ("new", "base"),
        ("new_blank", "base_blank"),
    ):
        c = paired_grounding(res[new], res[base])["timelens_probe"]
        keys = ("base_mean", "new_mean", "delta", "ci95", "better", "worse", "n", "p_value")
        rows[f"{new} vs {base}"] = {k: c[k] for k in keys}
        print(f"{new} vs {base}: {c['base_mean']:.2f} -> {c['new_mean']:.2f} (delta {c['delta']:+.2f}, 95% CI "
              f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]; {c['better']} better, {c['worse']} worse of {c['n']}; "
              f"one-sided p {c['p_value']:.2g})")  # fmt: skip
    (a.out / "probe_blank_control.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
