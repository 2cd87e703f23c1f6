"""WebDataset shards of re-encoded clips: encode, plan, write atomically and deterministically, verify, read.

Follows the WebDataset tar convention (github.com/webdataset/webdataset): a sample is the run of consecutive
members sharing a basename up to the first dot, so keys must be dot-free; here a sample is ``<key>.mp4`` (the clip
re-encoded with H.264, short GOP so random access decodes at most one GOP, capped resolution) + ``<key>.json``
(docs/DATA_FORMATS.md section 3).

Why each choice:
- Determinism: members are written in sorted key order with fixed mtime/uid/gid/mode and empty user/group names,
  JSON with sorted keys, so the same samples always give a byte-identical tar and the sha256 is a content id.
- Atomicity: a shard is streamed to a hidden temp name beside its final name, fsynced, then renamed
  (``keye.core.atomic``); a SIGKILL at any point leaves at most a ``.<name>.*.tmp`` file, never a partial ``<name>.tar``.

Resume design (how a crashed shard stage continues without losing or duplicating anything):
1. Each clip is encoded once into a cache directory: ``<cache_dir>/<params digest>/<key>.mp4`` (``ensure_clip``);
   the file is written atomically, so if it exists it is complete and it is skipped on a re-run. The encode
   parameters are part of the path, so changing them never reuses stale clips.
2. Clips are grouped into shards by their actual encoded size, in sorted key order (``plan_shards``): the same clip
   set and target always give the same grouping and names ``<prefix>-<index:06d>``.
3. For each planned shard the sha256 of the tar it would produce is computed by streaming the tar into a hash
   (no write); a shard already present under its final name with exactly that sha256 is skipped
   (``write_shards``), anything else is (re)written. Stale temps of killed writers can be removed with
   ``keye.core.atomic.remove_stale_temps`` under the workspace lock.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from keye.core.atomic import atomic_path
from keye.core.hashing import sha256_file

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
TAR_MTIME = 0  # fixed member mtime: byte-identical tars for identical inputs
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------------- encode
@dataclass(frozen=True)
class EncodeParams:
    """Everything that changes the bytes of an encoded clip (so it also names the clip cache)."""

    max_side: int = 448
    fps: float | None = None  # None keeps the source rate; never upsampled
    gop_seconds: float = 1.0
    crf: int = 23
    preset: str = "veryfast"
    threads: int = 1  # fixed thread count keeps x264 output identical across machines
    x264_params: str = "scenecut=0:mbtree=0"  # v2 (issue 24): mbtree off, see encode_clip

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class ClipEncodeInfo:
    """Describes the encoded mp4 (not the source): what the shard JSON's width/height/fps/duration must say."""

    width: int
    height: int
    fps: float
    duration: float
    n_frames: int
    bytes: int


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most ``max_side``, both sides even (yuv420p needs it)."""
    scale = min(1.0, max_side / float(max(width, height)))
    return _even(width * scale), _even(height * scale)


def _clockwise_rotation(ccw: float | None) -> int:
    """PyAV reports the display rotation counter-clockwise; the pixels need this many degrees clockwise."""
    if not ccw or not math.isfinite(ccw):
        return 0
    return int(round(-ccw / 90.0)) % 4 * 90


def _upright_yuv(frame: Any, width: int, height: int, rotation: int) -> Any:
    """Scale to (width, height) in the displayed orientation, applying rotation metadata, as yuv420p."""
    import av

    if not rotation:
        return frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
    w, h = (height, width) if rotation in (90, 270) else (width, height)
    arr = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    arr = np.ascontiguousarray(np.rot90(arr, k=-(rotation // 90)))
    return av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")


def encode_clip(
    src_path: str | os.PathLike[str],
    start: float,
    end: float,
    out_path: str | os.PathLike[str],
    max_side: int = 448,
    fps: float | None = None,
    gop: float = 1.0,
    *,
    crf: int = 23,
    preset: str = "veryfast",
    threads: int = 1,
    x264_params: str = EncodeParams.x264_params,
) -> ClipEncodeInfo:
    """Re-encode the source frames in [start, end) seconds to an H.264 mp4 at ``out_path``, atomically.

    ``gop`` is the keyframe interval in seconds (short, so a reader seeking anywhere decodes at most that much).
    Times are relative to the video stream's first timestamp. Each source frame belongs to exactly one of two
    adjacent clips (half-frame tolerance at the boundaries). Audio is dropped: shards carry video only.
    Rotation metadata is applied (the mp4 holds upright pixels, as ``keye.data.video.decode_frames`` returns
    them). Raises ValueError when the interval holds no frame.
    """
    import av

    if not end > start:
        raise ValueError(f"encode_clip: empty interval [{start}, {end})")
    with av.open(str(src_path)) as inp:
        if not inp.streams.video:
            raise ValueError(f"encode_clip: {src_path} has no video stream")
        vs = inp.streams.video[0]
        vs.thread_type = "AUTO"
        rate = vs.average_rate or vs.guessed_rate or Fraction(25)
        src_fps = float(rate)
        out_rate = Fraction(rate) if fps is None or fps >= src_fps else Fraction(fps).limit_denominator(1001)
        out_fps = float(out_rate)
        resample = out_rate != Fraction(rate)
        half = 0.5 / src_fps
        t0 = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
        if start - half > 0:
            inp.seek(int((start - half + t0) / vs.time_base), stream=vs, backward=True, any_frame=False)
        gop_frames = max(1, int(round(gop * out_fps)))
        rotation: int | None = None  # clockwise degrees to display upright, read from the first frame
        width = height = 0
        with atomic_path(out_path) as tmp:
            n = 0
            with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
                st = None
                for frame in inp.decode(vs):
                    if frame.pts is None:
                        continue
                    if rotation is None:
                        rotation = _clockwise_rotation(frame.rotation)
                        w0, h0 = frame.width, frame.height
                        if rotation in (90, 270):
                            w0, h0 = h0, w0
                        width, height = output_size(w0, h0, max_side)
                    t = float(frame.pts * vs.time_base) - t0
                    if t >= end - half:
                        break
                    # At the source rate every frame is kept; at a lower rate, output slot n takes the first
                    # source frame at or after start + n/out_fps (half-frame tolerance); output is constant-rate.
                    if t < start - half or (resample and t < start + n / out_fps - half):
                        continue
                    if st is None:
                        st = out.add_stream("libx264", rate=out_rate)
                        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
                        st.codec_context.thread_count = (
                            threads  # x264's own threads, not PyAV's default (auto)
                        )
                        st.codec_context.time_base = 1 / out_rate
                        # mbtree=0: x264's macroblock tree reads uninitialised lowres rows when the height is
                        # not a multiple of 16, so the same frames encoded later in a process gave other bytes
                        st.options = {
                            "preset": preset,
                            "crf": str(crf),
                            "threads": str(threads),
                            "x264-params": f"keyint={gop_frames}:min-keyint={gop_frames}:{x264_params}",
                        }
                    img = _upright_yuv(frame, width, height, rotation or 0)
                    img.pts = n
                    img.time_base = st.codec_context.time_base
                    for pkt in st.encode(img):
                        out.mux(pkt)
                    n += 1
                if st is None:
                    raise ValueError(f"encode_clip: no frame of {src_path} lies in [{start:.3f}, {end:.3f})")
                for pkt in st.encode(None):
                    out.mux(pkt)
        nbytes = Path(out_path).stat().st_size
    return ClipEncodeInfo(width, height, out_fps, n / out_fps, n, nbytes)


def probe_clip(path: str | os.PathLike[str]) -> ClipEncodeInfo:
    """ClipEncodeInfo of an mp4 written by ``encode_clip`` (used when a cached clip is reused)."""
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        fps = float(vs.average_rate or vs.guessed_rate)
        n = vs.frames or sum(1 for _ in c.demux(vs) if _.size)
        return ClipEncodeInfo(
            vs.codec_context.width, vs.codec_context.height, fps, n / fps, n, Path(path).stat().st_size
        )


def ensure_clip(
    cache_dir: str | os.PathLike[str],
    key: str,
    src_path: str | os.PathLike[str],
    start: float,
    end: float,
    params: EncodeParams = EncodeParams(),
) -> tuple[Path, ClipEncodeInfo, bool]:
    """Encode a clip into the cache unless it is already there; returns (mp4 path, info, was_cached)."""
    validate_key(key)
    path = Path(cache_dir) / params.digest() / f"{key}.mp4"
    if path.exists():
        return path, probe_clip(path), True
    info = encode_clip(
        src_path,
        start,
        end,
        path,
        max_side=params.max_side,
        fps=params.fps,
        gop=params.gop_seconds,
        crf=params.crf,
        preset=params.preset,
        threads=params.threads,
        x264_params=params.x264_params,
    )
    return path, info, False


# ------------------------------------------------------------------------------------------------------------- plan
def validate_key(key: str) -> str:
    """A WebDataset key: non-empty, only letters, digits, ``_`` and ``-`` (a dot would split the sample)."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(
            f"invalid shard key {key!r}: keys must be non-empty and use only [A-Za-z0-9_-] (no dots, no slashes)"
        )
    return key


def clip_key(clip_id: str) -> str:
    """The shard key of a clip: ``c`` + 16 hex chars of sha256(clip_id) (DATA_FORMATS.md section 3)."""
    return "c" + hashlib.sha256(clip_id.encode("utf-8")).hexdigest()[:16]


def _check_unique(keys: Iterable[str]) -> None:
    seen: set[str] = set()
    for k in keys:
        validate_key(k)
        if k in seen:
            raise ValueError(f"duplicate shard key {k!r}")
        seen.add(k)


def plan_shards(items: Sequence[tuple[str, int]], target_bytes: int) -> list[list[str]]:
    """Group (key, nbytes) into shards of about ``target_bytes`` each, in sorted key order.

    Greedy and deterministic: a shard is closed when the next item would push it past the target (an item larger
    than the target gets a shard of its own). The same items always give the same plan, whatever their order.
    """
    if target_bytes <= 0:
        raise ValueError("target_bytes must be positive")
    _check_unique(k for k, _ in items)
    plan: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for key, nbytes in sorted(items):
        if cur and cur_bytes + nbytes > target_bytes:
            plan.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
        cur_bytes += int(nbytes)
    if cur:
        plan.append(cur)
    return plan


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


# ------------------------------------------------------------------------------------------------------------ write
@dataclass(frozen=True)
class ShardInfo:
    path: Path
    sha256: str
    n_samples: int
    bytes: int
    keys: list[str] = field(default_factory=list)
    skipped: bool = False  # True when write_shards found it already complete


Sample = tuple[str, str | os.PathLike[str], dict[str, Any]]  # (key, mp4 path, json dict)


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _member(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = TAR_MTIME
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _HashingWriter(io.RawIOBase):
    """Write-only sink that hashes everything and optionally forwards it to a file."""

    def __init__(self, fh: BinaryIO | None = None) -> None:
        self.h = hashlib.sha256()
        self.fh = fh
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.h.update(mv)
        if self.fh is not None:
            self.fh.write(mv)
        self.n += len(mv)
        return len(mv)


class _HashingReader(io.RawIOBase):
    """Read-only view of a file that hashes every byte read through it."""

    def __init__(self, fh: BinaryIO) -> None:
        self.h = hashlib.sha256()
        self.fh = fh

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.h.update(data)
        return data


def _stream_tar(samples: Sequence[Sample], sink: _HashingWriter) -> list[str]:
    """Write the tar of ``samples`` (sorted by key) to ``sink``; the one code path behind writing and hashing."""
    ordered = sorted(samples, key=lambda s: s[0])
    _check_unique(k for k, _, _ in ordered)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, mp4_path, meta in ordered:
            mp4 = Path(mp4_path)
            with open(mp4, "rb") as fh:
                tar.addfile(_member(f"{key}.mp4", os.fstat(fh.fileno()).st_size), fh)
            blob = _json_bytes(meta)
            tar.addfile(_member(f"{key}.json", len(blob)), io.BytesIO(blob))
    return [k for k, _, _ in ordered]


def shard_sha256(samples: Sequence[Sample]) -> str:
    """sha256 of the tar ``write_shard`` would write for ``samples``, without writing it."""
    sink = _HashingWriter()
    _stream_tar(samples, sink)
    return sink.h.hexdigest()


def write_shard(out_dir: str | os.PathLike[str], shard_name: str, samples: Sequence[Sample]) -> ShardInfo:
    """Write ``<out_dir>/<shard_name>.tar`` holding ``<key>.mp4`` + ``<key>.json`` per sample, atomically.

    ``samples`` are (key, mp4 path, json dict). Raises ValueError on an invalid or duplicate key before writing.
    """
    if not samples:
        raise ValueError("write_shard: no samples")
    _check_unique(k for k, _, _ in samples)
    final = Path(out_dir) / f"{shard_name}.tar"
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        sink = _HashingWriter(fh)
        keys = _stream_tar(samples, sink)
        fh.flush()
    return ShardInfo(final, sink.h.hexdigest(), len(keys), sink.n, keys)


def write_shards(
    out_dir: str | os.PathLike[str],
    prefix: str,
    samples: Sequence[Sample],
    sizes: dict[str, int],
    target_bytes: int,
) -> list[ShardInfo]:
    """Plan shards by ``sizes`` (key -> mp4 bytes) and write each one unless it is already complete.

    A shard present under its final name whose sha256 equals that of the tar it would be now is skipped
    (``skipped=True``); this is what makes a re-run after a crash resume instead of redo.
    """
    by_key = {s[0]: s for s in samples}
    if len(by_key) != len(samples):
        _check_unique(s[0] for s in samples)
    plan = plan_shards([(k, sizes[k]) for k in by_key], target_bytes)
    return [
        ensure_shard(out_dir, shard_name(prefix, i), [by_key[k] for k in keys]) for i, keys in enumerate(plan)
    ]


def ensure_shard(out_dir: str | os.PathLike[str], name: str, samples: Sequence[Sample]) -> ShardInfo:
    """Write one shard unless an identical one is already under its final name (a re-run after a crash)."""
    final = Path(out_dir) / f"{name}.tar"
    if final.exists():
        want = shard_sha256(samples)
        if sha256_file(final) == want:
            return ShardInfo(
                final, want, len(samples), final.stat().st_size, [s[0] for s in samples], skipped=True
            )
    return write_shard(out_dir, name, samples)


# ------------------------------------------------------------------------------------------------------ read/verify
def read_shard(path: str | os.PathLike[str]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield (key, mp4 bytes, json dict) per sample, in tar order; raises ValueError on a malformed sample."""
    pending: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            fh = tar.extractfile(m)
            data = fh.read() if fh is not None else b""
            if key not in pending:
                if order and order[-1] != key:
                    yield _finish(order[-1], pending.pop(order[-1]))
                pending[key] = {}
                order.append(key)
            pending[key][ext] = data
    if order and order[-1] in pending:
        yield _finish(order[-1], pending.pop(order[-1]))


def _finish(key: str, parts: dict[str, bytes]) -> tuple[str, bytes, dict[str, Any]]:
    if set(parts) != {"mp4", "json"}:
        raise ValueError(f"sample {key!r} has members {sorted(parts)}; expected exactly mp4 and json")
    return key, parts["mp4"], json.loads(parts["json"].decode("utf-8"))


def verify_shard(
    path: str | os.PathLike[str],
    expected_sha256: str | None = None,
    *,
    expected_keys: Sequence[str] | None = None,
    with_webdataset: bool = False,
) -> list[str]:
    """Problems with a shard, empty when it is sound: missing file, sha256 mismatch, unreadable tar, a sample
    without its mp4/json pair, bad JSON, invalid or repeated keys, keys other than ``expected_keys``; with
    ``with_webdataset`` the ``webdataset`` library must also read it as the same samples."""
    p = Path(path)
    if not p.is_file():
        return [f"{p}: missing"]
    problems: list[str] = []
    samples: dict[str, set[str]] = {}
    order: list[str] = []
    with open(p, "rb") as raw:
        reader = _HashingReader(raw)  # one pass: the tar is parsed from the same bytes that are hashed
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    key, dot, ext = m.name.partition(".")
                    if not m.isfile() or not dot or "/" in m.name:
                        problems.append(f"{p}: unexpected member {m.name!r}")
                        continue
                    if not KEY_RE.match(key):
                        problems.append(f"{p}: invalid key {key!r}")
                    if key not in samples:
                        samples[key] = set()
                        order.append(key)
                    elif order[-1] != key:
                        problems.append(f"{p}: members of sample {key!r} are not consecutive")
                    if ext in samples[key]:
                        problems.append(f"{p}: sample {key!r} repeats {ext}")
                    samples[key].add(ext)
                    if ext == "json":
                        fh = tar.extractfile(m)
                        try:
                            json.loads((fh.read() if fh is not None else b"").decode("utf-8"))
                        except (UnicodeDecodeError, ValueError) as e:
                            problems.append(f"{p}: sample {key!r} json unreadable: {e}")
                    elif ext == "mp4" and m.size == 0:
                        problems.append(f"{p}: sample {key!r} mp4 is empty")
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{p}: unreadable tar: {e}")
        while reader.read(_CHUNK):  # the end-of-archive blocks and padding tarfile never asks for
            pass
    if expected_sha256 is not None and reader.h.hexdigest() != expected_sha256:
        problems.insert(0, f"{p}: sha256 {reader.h.hexdigest()} != expected {expected_sha256}")
    if any("unreadable tar" in x for x in problems):
        return problems
    for key in order:
        missing = {"mp4", "json"} - samples[key]
        extra = samples[key] - {"mp4", "json"}
        if missing:
            problems.append(f"{p}: sample {key!r} lacks {', '.join(sorted(missing))}")
        if extra:
            problems.append(f"{p}: sample {key!r} has unexpected {', '.join(sorted(extra))}")
    if not order:
        problems.append(f"{p}: no samples")
    if expected_keys is not None and sorted(expected_keys) != sorted(order):
        problems.append(
            f"{p}: keys differ from expected ({len(order)} present, {len(expected_keys)} expected)"
        )
    if with_webdataset and not problems:
        wk = webdataset_keys(p)
        if wk != order:
            problems.append(f"{p}: webdataset reads samples {wk[:5]}... not {order[:5]}...")
    return problems


def webdataset_keys(path: str | os.PathLike[str]) -> list[str]:
    """Keys of the samples that ``webdataset.WebDataset`` itself yields with both mp4 and json (no decoding)."""
    import webdataset as wds

    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    return [s["__key__"] for s in ds if "mp4" in s and "json" in s]
