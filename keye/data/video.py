"""Video probing and frame decoding with PyAV: reject bad inputs with a reason a person understands, and decode
only what the sampled frames need.

Follows the seek-then-decode-forward pattern of decord/torchvision video readers and qwen-vl-utils' PyAV path,
with the keyframe decision taken from the container index (PyAV `stream.index_entries`) when one exists.
REFERENCE.md section 5: long-GOP random access costs a whole GOP; frame threading (thread_type AUTO) is 3-5x.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

Source = str | os.PathLike[str] | BinaryIO


class VideoRejected(Exception):
    """An input that cannot be used as a video; `reason` is meant for people (logs, lineage `reason` column)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoProbe:
    """What ingest records about a video. width/height are as displayed (after rotation)."""

    container: str
    codec: str
    duration: float
    fps: float
    width: int
    height: int
    rotation: int  # clockwise degrees to apply for display: 0, 90, 180 or 270
    n_frames: int  # from the container when it says, else duration * fps
    n_video_streams: int
    n_audio_streams: int
    bit_rate: int | None
    size_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _sniff(head: bytes) -> str | None:
    """Name of the container the first bytes announce, if any (to tell 'truncated' from 'not a video')."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4/MOV"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "Matroska/WebM"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"FLV"):
        return "FLV"
    if head.startswith(b"OggS"):
        return "Ogg"
    return None


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _ccw_to_cw(ccw: float | None) -> int:
    if not ccw or not math.isfinite(ccw):
        return 0
    return int(round(-ccw / 90.0)) % 4 * 90


def stream_fps(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return 0.0


def _stream_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def open_video(source: Source) -> av.container.InputContainer:
    if isinstance(source, str | os.PathLike):
        return av.open(os.fspath(source), mode="r")
    return av.open(source, mode="r")


def _decode_near(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, t: float, n: int
) -> list[av.VideoFrame]:
    """Decode up to `n` frames starting at the keyframe before time `t` (seconds from stream start)."""
    tb = stream.time_base
    start = stream.start_time or 0
    if t > 0:
        container.seek(start + int(t / tb), stream=stream, backward=True, any_frame=False)
    else:
        container.seek(start, stream=stream, backward=True, any_frame=False)
    frames: list[av.VideoFrame] = []
    for frame in container.decode(stream):
        frames.append(frame)
        if len(frames) >= n:
            break
    return frames


def probe(path: str | os.PathLike[str], min_duration: float = 1.0, check_frames: int = 3) -> VideoProbe:
    """Read the metadata of a video and decode a few frames at its start, middle and end.

    Raises VideoRejected for: a missing or empty file, a file FFmpeg does not recognise (or a damaged/truncated
    container), no video stream, a duration under `min_duration`, and frames that cannot be decoded.
    """
    p = Path(path)
    if not p.exists():
        raise VideoRejected(f"file does not exist: {p}")
    if not p.is_file():
        raise VideoRejected(f"not a regular file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise VideoRejected("empty file (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(512)
    try:
        container = open_video(p)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        kind = _sniff(head)
        if kind:
            raise VideoRejected(
                f"damaged or truncated {kind} file: FFmpeg cannot read its header/index ({error_text(e)})"
            ) from None
        if _looks_like_text(head):
            raise VideoRejected("not a video: the file is plain text") from None
        raise VideoRejected(
            f"not a video: FFmpeg does not recognise the file format ({error_text(e)})"
        ) from None
    with container:
        vstreams = list(container.streams.video)
        n_audio = len(container.streams.audio)
        if not vstreams:
            what = f"audio-only file with {n_audio} audio stream(s)" if n_audio else "no audio either"
            raise VideoRejected(f"no video stream ({what})")
        stream = vstreams[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.name:
            raise VideoRejected("video stream has no decoder available in FFmpeg")
        fps = stream_fps(stream)
        duration = _stream_duration(container, stream)
        if duration <= 0 and stream.frames and fps:
            duration = stream.frames / fps
        if duration < min_duration:
            raise VideoRejected(f"too short: {duration:.2f} s, the minimum is {min_duration:.2f} s")
        if fps <= 0:
            raise VideoRejected("video stream has no frame rate")
        stream.thread_type = "AUTO"
        rotation = 0
        for label, t in (("start", 0.0), ("middle", duration / 2), ("end", max(0.0, duration - 1.0))):
            try:
                frames = _decode_near(container, stream, t, check_frames)
            except (av.error.FFmpegError, ValueError, OSError) as e:
                raise VideoRejected(
                    f"undecodable frames near the {label} (t~{t:.1f} s): {error_text(e)}; the file is corrupt or truncated"
                ) from None
            if not frames:
                raise VideoRejected(
                    f"no frame could be decoded near the {label} (t~{t:.1f} s); the file is truncated or corrupt"
                )
            if label == "start":
                rotation = _ccw_to_cw(frames[0].rotation)
        w, h = int(ctx.width), int(ctx.height)
        if rotation in (90, 270):
            w, h = h, w
        n_frames = int(stream.frames) if stream.frames else int(round(duration * fps))
        bit_rate = container.bit_rate or ctx.bit_rate or None
        return VideoProbe(
            container=container.format.name,
            codec=ctx.name,
            duration=duration,
            fps=fps,
            width=w,
            height=h,
            rotation=rotation,
            n_frames=n_frames,
            n_video_streams=len(vstreams),
            n_audio_streams=n_audio,
            bit_rate=int(bit_rate) if bit_rate else None,
            size_bytes=size,
        )


def error_text(e: BaseException) -> str:
    """One short line for a rejection reason: FFmpeg's message and where it came from, never a traceback."""
    if isinstance(e, av.error.FFmpegError) and e.strerror:
        where = f" in {e.log[1]}" if getattr(e, "log", None) and len(e.log) > 1 and e.log[1] else ""
        return f"{e.strerror}{where}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None, rotation: int) -> np.ndarray:
    """Convert one selected frame (resize in swscale, cheap, before rotating). Returns a view of the converted
    frame's pooled buffer: the caller copies it once into the output, so no temporary array is allocated."""
    if size is not None:
        h, w = size
        if rotation in (90, 270):
            h, w = w, h
        rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR")
    else:
        rgb = frame.reformat(format="rgb24")
    plane = rgb.planes[0]
    arr = np.frombuffer(plane, np.uint8).reshape(rgb.height, plane.line_size)[:, : rgb.width * 3]
    arr = arr.reshape(rgb.height, rgb.width, 3)
    if rotation:
        arr = np.rot90(arr, k=-(rotation // 90))
    return arr


def _keyframe_times(stream: av.video.stream.VideoStream) -> list[float]:
    """Keyframe times (s from stream start) from the container index; empty when there is no index."""
    try:
        entries = stream.index_entries
        if not entries:
            return []
        start = stream.start_time or 0
        tb = float(stream.time_base)
        return sorted((e.timestamp - start) * tb for e in entries if e.is_keyframe)
    except (AttributeError, TypeError, av.error.FFmpegError):
        return []


def nal_length_size(stream: av.video.stream.VideoStream) -> int | None:
    """Bytes of the NAL length prefix for length-prefixed H.264/HEVC (mp4/mkv); None for Annex B or others."""
    ctx = stream.codec_context
    extra = bytes(ctx.extradata or b"")
    if ctx.name == "h264" and len(extra) >= 5 and extra[0] == 1:
        return (extra[4] & 3) + 1
    if ctx.name == "hevc" and len(extra) >= 22 and extra[0] == 1:
        return (extra[21] & 3) + 1
    return None


_HEVC_NON_REF = {0, 2, 4, 6, 8, 10, 12, 14}  # TRAIL_N, TSA_N, STSA_N, RADL_N, RASL_N, reserved *_N


def is_non_reference(data: bytes | memoryview, codec: str, nal_len: int) -> bool:
    """True when no later frame can refer to this packet's picture (H.264 nal_ref_idc == 0 on every slice,
    HEVC sub-layer non-reference NAL types), so a decoder may skip it unless it is wanted itself."""
    pos, n, vcl = 0, len(data), 0
    while pos + nal_len < n:
        size = int.from_bytes(data[pos : pos + nal_len], "big")
        pos += nal_len
        if size <= 0 or pos + size > n:
            return False
        b0 = data[pos]
        if codec == "h264":
            kind = b0 & 0x1F
            if kind in (1, 5):
                vcl += 1
                if (b0 >> 5) & 3:
                    return False
        else:
            kind = (b0 >> 1) & 0x3F
            if kind < 32:
                vcl += 1
                if kind not in _HEVC_NON_REF:
                    return False
        pos += size
    return vcl > 0


@dataclass
class DecodeStats:
    """What one decode_frames call cost: frames out of the decoder, seeks, frames converted to RGB, and
    non-reference packets never sent to the decoder."""

    decoded: int = 0
    seeks: int = 0
    converted: int = 0
    skipped: int = 0


def decode_frames(
    source: Source,
    timestamps: Sequence[float],
    size: tuple[int, int] | None = None,
    *,
    gop_guess_s: float = 5.0,
    stats: DecodeStats | None = None,
) -> np.ndarray:
    """Frames shown at `timestamps` (seconds from the start), as uint8 [N, H, W, 3] RGB in the requested order.

    Decodes only what the targets need: for each target (in time order) it seeks to the keyframe before it when
    a keyframe lies between the decoder's position and the target (from the container index; without an index,
    when the gap exceeds the largest keyframe interval seen so far, or `gop_guess_s` before any is seen), and
    otherwise decodes forward. Packets of non-reference pictures (H.264/HEVC B-frames nothing refers to) that are
    not themselves wanted are never decoded. Only the selected frames are converted to RGB (and resized to
    `size` = (h, w), the displayed orientation). Rotation metadata is applied. A target past the end gets the
    last frame. Containers whose timestamp seek lands after the target (MPEG-TS) are re-seeked further back.
    """
    st = stats if stats is not None else DecodeStats()
    targets = [float(t) for t in timestamps]
    if any(not math.isfinite(t) for t in targets):
        raise ValueError("timestamps must be finite")
    try:
        container = open_video(source)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoRejected(f"cannot open video: {error_text(e)}") from None
    with container:
        if not container.streams.video:
            raise VideoRejected("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not targets:
            h, w = size if size else (int(stream.codec_context.height), int(stream.codec_context.width))
            return np.zeros((0, h, w, 3), np.uint8)
        fps = stream_fps(stream) or 25.0
        half = 0.5 / fps
        tb: Fraction = stream.time_base
        t0 = stream.start_time or 0
        index_kf = _keyframe_times(stream)
        seen_kf: list[float] = []
        max_kf_gap = 0.0

        order = sorted(range(len(targets)), key=lambda i: targets[i])
        result: np.ndarray | None = None  # allocated at the first frame, written in place (no final stack)
        frames_iter = None
        pos: float | None = None  # time of the last decoded frame; None right after open/seek
        last_frame: av.VideoFrame | None = None
        last_arr: np.ndarray | None = None
        rotation: int | None = None
        pending: av.VideoFrame | None = None  # decoded frame past the previous target, not consumed yet

        def store(i: int, arr: np.ndarray) -> None:
            nonlocal result
            if result is None:
                result = np.empty((len(targets), *arr.shape), dtype=np.uint8)
            result[i] = arr

        def convert(frame: av.VideoFrame) -> np.ndarray:
            st.converted += 1
            return _to_rgb(frame, size, rotation or 0)

        nal_len = nal_length_size(stream)
        codec_name = stream.codec_context.name
        sorted_t = [targets[i] for i in order]
        cursor = 0  # index in sorted_t of the target being served

        def wanted(pkt_t: float) -> bool:
            k = bisect.bisect_left(sorted_t, pkt_t - half, lo=cursor)
            return k < len(sorted_t) and sorted_t[k] <= pkt_t + 3 * half

        def frames() -> Iterator[av.VideoFrame]:
            for packet in container.demux(stream):
                if (
                    nal_len is not None
                    and packet.pts is not None
                    and packet.size
                    and not packet.is_keyframe
                    and not wanted(float((packet.pts - t0) * tb))
                    and (packet.is_disposable or is_non_reference(memoryview(packet), codec_name, nal_len))
                ):
                    st.skipped += 1
                    continue
                yield from packet.decode()

        landing: list[float] = []  # [target, back-off] until the first frame after a seek comes out

        def seek_to(t: float, back: float = 0.0) -> None:
            nonlocal frames_iter, pos, pending
            at = t - back
            if back > 0 and at <= 0:
                # timestamp seeking kept landing after the target (e.g. MPEG-TS): read from the first byte
                container.seek(0, unsupported_byte_offset=True)
            else:
                container.seek(t0 + max(0, int(at / tb)), stream=stream, backward=True, any_frame=False)
            frames_iter = frames()
            st.seeks += 1
            pos, pending = None, None
            landing[:] = [t, back]

        def seek_earlier() -> bool:
            """The seek landed after its target (no exact index): retry further back, doubling the margin."""
            if not landing:
                return False
            t, back = landing
            if back > 0 and t - back <= 0:  # already read from the start: take what comes
                landing.clear()
                return False
            seek_to(t, back=max(1.0, 2 * back))
            return True

        def should_seek(t: float) -> bool:
            if frames_iter is None or pos is None:
                return True
            if t - pos <= half:
                return False
            if index_kf:
                k = bisect.bisect_right(index_kf, t + half) - 1
                return k >= 0 and index_kf[k] > pos + half
            known = max_kf_gap if len(seen_kf) >= 2 else gop_guess_s
            return t - pos > known

        exhausted = False
        for cursor, i in enumerate(order):  # noqa: B007 (cursor is read by wanted())
            t = targets[i]
            if last_frame is not None and pos is not None and abs(t - pos) <= half:
                last_arr = last_arr if last_arr is not None else convert(last_frame)
                store(i, last_arr)
                continue
            if not exhausted and should_seek(t):
                seek_to(t)
            chosen: av.VideoFrame | None = None
            while not exhausted:
                if pending is not None:
                    frame, pending = pending, None
                else:
                    try:
                        frame = next(frames_iter)  # type: ignore[arg-type]
                        st.decoded += 1
                    except StopIteration:
                        if seek_earlier():
                            continue
                        exhausted = True
                        break
                    except (av.error.FFmpegError, ValueError) as e:
                        raise VideoRejected(f"undecodable frames near t~{t:.2f} s: {error_text(e)}") from None
                ft = float((frame.pts - t0) * tb) if frame.pts is not None else (pos or 0.0) + 2 * half
                if landing:
                    if ft - half > t and seek_earlier():
                        continue
                    landing.clear()
                if rotation is None:
                    rotation = _ccw_to_cw(frame.rotation)
                if frame.key_frame and (not seen_kf or ft > seen_kf[-1]):
                    if seen_kf:
                        max_kf_gap = max(max_kf_gap, ft - seen_kf[-1])
                    seen_kf.append(ft)
                if ft + half < t:  # before the target: decoded for reference only, never converted
                    pos, last_frame, last_arr = ft, frame, None
                    continue
                if ft - half > t and last_frame is not None and pos is not None and pos < t:
                    # overshot (variable frame rate): the previous frame is the one shown at t
                    pending = frame
                    chosen = last_frame
                    break
                pos, last_frame, last_arr = ft, frame, None
                chosen = frame
                break
            if chosen is None:
                chosen = last_frame
            if chosen is None:
                raise VideoRejected(f"no frame could be decoded at or before t={t:.2f} s")
            if chosen is last_frame and last_arr is not None:
                store(i, last_arr)
            else:
                arr = convert(chosen)
                store(i, arr)
                if chosen is last_frame:
                    last_arr = arr
        assert result is not None
        return result
