"""A whole synthetic set: the specs of a seed, the held-out split, videos written in parallel with sidecars."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from keye.datasets.synthetic.annotate import (
    annotations,
)
from keye.datasets.synthetic.render import (
    encode_video,
)
from keye.datasets.synthetic.spec import (
    MAX_OBJECTS,
    VideoSpec,
    make_spec,
)


def _heldout(n: int, seed: int, fraction: float) -> set[int]:
    if n < 3 or fraction <= 0:  # 0: a train-only set (e.g. a second source that adds training videos)
        return set()
    k = max(1, int(round(n * fraction)))
    rng = np.random.default_rng([seed, 99])
    return {int(i) for i in rng.permutation(n)[:k]}


def _write_one(args: tuple[VideoSpec, str]) -> str:
    spec, out_dir = args
    path = Path(out_dir) / spec.filename
    encode_video(spec, path)
    return str(path)


def dataset_specs(
    n_videos: int = 40,
    n_long: int = 1,
    seed: int = 0,
    heldout_fraction: float = 0.175,
    long_duration: float = 600.0,
    long_size: tuple[int, int] = (128, 96),
    long_fps: int = 6,
    max_objects: int = MAX_OBJECTS,
    color_changes: bool = True,
) -> list[VideoSpec]:
    """The specs of a dataset (no files); the long videos always belong to the train split (and keep their many
    shapes and changes: they exist for long-context work)."""
    held = _heldout(n_videos, seed, heldout_fraction)
    specs = [
        make_spec(
            i,
            seed,
            split="heldout" if i in held else "train",
            max_objects=max_objects,
            color_changes=color_changes,
        )
        for i in range(n_videos)
    ]
    for j in range(n_long):
        specs.append(
            make_spec(
                j,
                seed,
                long=True,
                width=long_size[0],
                height=long_size[1],
                fps=long_fps,
                duration=long_duration,
            )
        )
    return specs


def probe_specs(
    n_videos: int,
    n_probe: int,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
    color_changes: bool = True,
) -> list[VideoSpec]:
    """`n_probe` more held-out videos of a set: indices after its `n_videos` short ones, same seed and settings, so
    they are new draws of the same generator that no training split contains.

    Why: a held-out split of a few dozen videos cannot show a gain of one or two points at p < 0.01; an eval-only
    probe of new videos from the same distribution can, without growing the data stages."""
    return [
        make_spec(i, seed, split="heldout", max_objects=max_objects, color_changes=color_changes)
        for i in range(n_videos, n_videos + n_probe)
    ]


def write_specs(
    out_dir: str | os.PathLike[str], specs: list[VideoSpec], workers: int | None = None
) -> list[Path]:
    """Write each spec's video (in a process pool) and `<stem>.json` sidecar into `out_dir`; returns the video
    paths in spec order.

    Existing complete files are kept (a re-run only fills what is missing); annotations are always rewritten
    (atomically) because they are cheap and must match the seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        doc = json.dumps(annotations(spec), indent=1, sort_keys=False) + "\n"
        tmp = out / f".{spec.name}.json.tmp"
        tmp.write_text(doc)
        os.replace(tmp, out / f"{spec.name}.json")
    todo = [(s, str(out)) for s in specs if not (out / s.filename).exists()]
    todo.sort(key=lambda a: -a[0].n_frames * a[0].width * a[0].height)  # longest first balances the pool
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n_workers <= 1 or len(todo) <= 1:
        for item in todo:
            _write_one(item)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            list(pool.map(_write_one, todo))
    return [out / s.filename for s in specs]


def generate_dataset(
    out_dir: str | os.PathLike[str],
    n_videos: int = 40,
    n_long: int = 1,
    seed: int = 0,
    *,
    heldout_fraction: float = 0.175,
    long_duration: float = 600.0,
    long_size: tuple[int, int] = (128, 96),
    long_fps: int = 6,
    workers: int | None = None,
    max_objects: int = MAX_OBJECTS,
    color_changes: bool = True,
) -> list[Path]:
    """Write videos + `<stem>.json` sidecars into `out_dir` (write_specs); returns the video paths (short ones,
    then long)."""
    specs = dataset_specs(
        n_videos,
        n_long,
        seed,
        heldout_fraction,
        long_duration,
        long_size,
        long_fps,
        max_objects=max_objects,
        color_changes=color_changes,
    )
    return write_specs(out_dir, specs, workers)
