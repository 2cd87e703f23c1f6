"""The embedded synthetic event-video dataset: coloured shapes that appear, move, change and disappear at known
times over moving, noisy backgrounds, with sidecar annotations (docs/DATA_FORMATS.md section 1).

Why: a default dataset that needs no download, exercises the codec paths (H.264/MPEG-4/VP9, mp4/mkv/webm, rotation,
scene cuts, long low-fps videos) and is learnable from pixels by a tiny model (colour, shape, position, order,
timing). In the spirit of CLEVRER / CATER-style synthetic video QA, written from scratch.
Deterministic by seed: annotations are byte-identical, videos decode to the same frames.
Modules: spec (what a video is), render (frames, encoding), annotate (sidecar questions and answers),
dataset (a whole set); bad-input fixtures for tests are in tests/fixtures/corrupt_videos.py.
"""

from __future__ import annotations

from keye.datasets.synthetic.annotate import (
    annotations,
)
from keye.datasets.synthetic.dataset import (
    dataset_specs,
    generate_dataset,
    probe_specs,
    write_specs,
)
from keye.datasets.synthetic.render import (
    encode_video,
    expected_frames,
    render_frame,
    shape_mask,
)
from keye.datasets.synthetic.spec import (
    CODEC_WEIGHTS,
    CODECS,
    COLORS,
    DIRECTIONS,
    FPS_CHOICES,
    FPS_WEIGHTS,
    GENERATOR_VERSION,
    MAX_OBJECTS,
    REGIONS,
    SCHEMA,
    SHAPES,
    SIZE_WEIGHTS,
    SIZES,
    ObjectTrack,
    VideoSpec,
    make_spec,
)

__all__ = [
    "CODECS",
    "CODEC_WEIGHTS",
    "COLORS",
    "DIRECTIONS",
    "FPS_CHOICES",
    "FPS_WEIGHTS",
    "GENERATOR_VERSION",
    "MAX_OBJECTS",
    "ObjectTrack",
    "REGIONS",
    "SCHEMA",
    "SHAPES",
    "SIZES",
    "SIZE_WEIGHTS",
    "VideoSpec",
    "annotations",
    "dataset_specs",
    "encode_video",
    "expected_frames",
    "generate_dataset",
    "make_spec",
    "probe_specs",
    "render_frame",
    "shape_mask",
    "write_specs",
]
