"""`python -m keye.datasets.synthetic OUT_DIR`: write a synthetic set."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from keye.datasets.synthetic import __doc__ as DOC
from keye.datasets.synthetic.dataset import generate_dataset


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m keye.datasets.synthetic", description=DOC.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=40, help="short videos")
    ap.add_argument("--long", type=int, default=1, help="long (10 min) videos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-duration", type=float, default=600.0)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    paths = generate_dataset(a.out_dir, a.n, a.long, a.seed, long_duration=a.long_duration, workers=a.workers)
    print(f"wrote {len(paths)} videos to {a.out_dir}")


if __name__ == "__main__":
    main()
