"""bench/decode: frames delivered per CPU-second by keye.data.video.decode_frames (2 fps plan) vs a plain PyAV loader
that decodes every frame and converts every frame to an RGB ndarray, in the same run, on
(a) a 720p short-GOP H.264 clip, (b) a 10-minute 720p H.264 video with GOP >= 250 (both x264 ultrafast: no
B-frames), and (c) a 2-minute 720p GOP-250 H.264 video with B-frames (x264 veryfast, fixed P-B-b-B pattern).

Both deliver the same frames (the 2 fps plan of keye.data.sampling, full 720p RGB, as arrays of --chunk frames);
both use frame threading (thread_type AUTO), so the difference is only what gets decoded and converted.
"Per core" = frames / CPU seconds of the process (all threads), which is also robust to other jobs on a shared
machine. The bound: the decoder must still decode, per GOP, every reference frame from the keyframe up to the GOP's
last target (column `bound`); the cost bound = bound frames x decode cost + delivered frames x (RGB conversion +
copy into the output), with the costs measured in the same run.

    python bench/decode.py [--minutes 10] [--fps 30] [--gop-long 250] [--gop-short 30] [--write-results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from keye.data.sampling import SamplingPolicy, plan_frames
from keye.data.video import DecodeStats, decode_frames, is_non_reference, nal_length_size, probe


def make_video(
    path: Path,
    seconds: float,
    fps: int,
    gop: int,
    width: int = 1280,
    height: int = 720,
    preset: str = "ultrafast",
) -> float:
    """Synthetic 720p pattern (scrolling texture + moving block) written straight as yuv420p; returns encode s."""
    rng = np.random.default_rng(0)
    tex_y = (rng.random((height // 8 + 2, width // 8 + 2)) * 200 + 28).astype(np.uint8)
    tex_y = np.kron(tex_y, np.ones((8, 8), np.uint8))  # blocky texture, 8 px cells
    ramp_u = np.tile(np.linspace(60, 200, width // 2, dtype=np.float32).astype(np.uint8), (height // 2, 1))
    ramp_v = ramp_u[:, ::-1].copy()
    n = int(seconds * fps)
    t0 = time.perf_counter()
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {
            "preset": "ultrafast",
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
            **({"x264-params": "b-adapt=0:bframes=3:b-pyramid=normal"} if preset != "ultrafast" else {}),
            "crf": "23",
        }
        for k in range(n):
            ox, oy = (2 * k) % 8, k % 8
            y = tex_y[oy : oy + height, ox : ox + width].copy()
            bx = int((k * 7) % (width - 160))
            by = int((height - 160) * (0.5 + 0.4 * np.sin(k / 40)))
            y[by : by + 160, bx : bx + 160] = 235 - (k % 50)
            frame_data = np.concatenate(
                [y, ramp_u.reshape(height // 4, width), ramp_v.reshape(height // 4, width)]
            )
            frame = av.VideoFrame.from_ndarray(frame_data, format="yuv420p")
            frame.pts = k
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return time.perf_counter() - t0


def naive_loader(
    path: Path, timestamps: list[float], batch: int | None = None
) -> tuple[np.ndarray | None, int]:
    """What a plain loader does: decode every frame, convert every frame, deliver the ones nearest the targets:
    all at once, or (batch) as arrays of `batch` frames handed on and dropped, like decode_frames per clip."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        half = 0.5 / float(s.average_rate)
        t0 = s.start_time or 0
        want = sorted(timestamps)
        out: list[np.ndarray] = []
        j = 0
        n = 0
        arr = None
        for f in c.decode(s):
            arr = f.to_ndarray(format="rgb24")
            n += 1
            t = float((f.pts - t0) * s.time_base)
            while j < len(want) and t + half >= want[j]:
                out.append(arr)
                j += 1
                if batch and len(out) == batch:
                    np.stack(out)
                    out = []
        out.extend(arr for _ in want[j:])
    if batch:
        if out:
            np.stack(out)
        return None, n
    return np.stack(out), n


def decode_only(path: Path) -> tuple[int, float]:
    """Decode every frame, convert none: the per-frame decode cost for the bound."""
    c0 = time.process_time()
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        n = sum(1 for _ in c.decode(s))
    return n, time.process_time() - c0


def copy_cost(path: Path, n: int) -> float:
    """CPU seconds per frame to copy a converted frame into a freshly allocated [n,H,W,3] output (first touch of
    the output memory): part of delivering frames as an array, for any loader."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frame = next(iter(c.decode(s))).to_ndarray(format="rgb24")
    c0 = time.process_time()
    out = np.empty((n, *frame.shape), np.uint8)
    for i in range(n):
        out[i] = frame
    cpu = time.process_time() - c0
    del out
    return cpu / n


def bound_frames(path: Path, timestamps: list[float]) -> int:
    """Fewest frames any decoder must decode to produce the targets: per GOP (in decode order) every reference
    frame from the keyframe up to the GOP's last target, plus the targets themselves."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate)
        t0 = s.start_time or 0
        nal_len = nal_length_size(s)
        packets = []  # decode order: (display frame index, keyframe, reference)
        for p in c.demux(s):
            if p.pts is None or not p.size:
                continue
            ref = not (nal_len and is_non_reference(memoryview(p), s.codec_context.name, nal_len))
            packets.append((round(float((p.pts - t0) * s.time_base) * fps), p.is_keyframe, ref))
    wanted = {round(t * fps) for t in timestamps}
    total, gop, last_target = 0, [], -1

    def close() -> int:
        if last_target < 0:
            return 0
        head = gop[: last_target + 1]
        return sum(1 for f, _, ref in head if ref or f in wanted)

    for f, key, ref in packets:
        if key and gop:
            total += close()
            gop, last_target = [], -1
        gop.append((f, key, ref))
        if f in wanted:
            last_target = len(gop) - 1
    return total + close()


def run_case(name: str, path: Path, chunk: int = 256, repeat: int = 2) -> dict:
    pr = probe(path)
    policy = SamplingPolicy(fps=2.0, max_frames=100_000, duration_scaling=False, total_token_budget=10**9)
    plan = plan_frames(pr.duration, pr.width, pr.height, policy, video_fps=pr.fps)
    ts = plan.timestamps
    # warm the page cache so both runs read from memory
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    base_cpu = base_wall = ours_cpu = ours_wall = float("inf")
    for _ in range(repeat):  # alternate the two, keep each one's best run (the machine may be shared)
        c0, w0 = time.process_time(), time.perf_counter()
        _, n_all = naive_loader(path, ts, batch=chunk)
        base_cpu, base_wall = (
            min(base_cpu, time.process_time() - c0),
            min(base_wall, time.perf_counter() - w0),
        )
        st = DecodeStats()
        c0, w0 = time.process_time(), time.perf_counter()
        for k in range(0, len(ts), chunk):  # a loader asks for one clip's frames at a time
            frames = decode_frames(path, ts[k : k + chunk], stats=st)
            del frames
        ours_cpu, ours_wall = (
            min(ours_cpu, time.process_time() - c0),
            min(ours_wall, time.perf_counter() - w0),
        )
    # correctness, untimed: the same frames as the plain loader on a spread of 48 targets
    pick = sorted({ts[int(i)] for i in np.linspace(0, len(ts) - 1, 48)})
    same = bool(np.array_equal(naive_loader(path, pick)[0], decode_frames(path, pick)))
    n_dec, dec_cpu = decode_only(path)
    d = dec_cpu / n_dec
    conv = max(0.0, (base_cpu - dec_cpu) / n_all)
    keep = conv + copy_cost(path, min(len(ts), chunk))
    b_frames = bound_frames(path, ts)
    bound_cpu = b_frames * d + len(ts) * keep
    return {
        "case": name,
        "frames_total": n_all,
        "delivered": len(ts),
        "gop": gop_of(path),
        "naive_fps_per_core": len(ts) / base_cpu,
        "ours_fps_per_core": len(ts) / ours_cpu,
        "speedup": base_cpu / ours_cpu,
        "naive_wall_s": base_wall,
        "ours_wall_s": ours_wall,
        "naive_cpu_s": base_cpu,
        "ours_cpu_s": ours_cpu,
        "ours_decoded": st.decoded,
        "ours_seeks": st.seeks,
        "ours_skipped": st.skipped,
        "bound_decoded": b_frames,
        "decode_ms": d * 1e3,
        "convert_ms": conv * 1e3,
        "deliver_ms": keep * 1e3,
        "bound_cpu_s": bound_cpu,
        "bound_speedup": base_cpu / bound_cpu,
        "identical": same,
        "chunk": chunk,
    }


def gop_of(path: Path) -> int:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        kf = [i for i, e in enumerate(s.index_entries) if e.is_keyframe]
    return int(np.max(np.diff(kf))) if len(kf) > 1 else len(s.index_entries)


HEADER = (
    "| case | frames | delivered (2 fps) | GOP | naive frames/s/core | decode_frames frames/s/core | speedup | "
    "decoded (ours / bound / all) | bound speedup | identical |\n|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['case']} | {r['frames_total']} | {r['delivered']} | {r['gop']} | {r['naive_fps_per_core']:.1f} | "
        f"{r['ours_fps_per_core']:.1f} | {r['speedup']:.2f}x | {r['ours_decoded']} / {r['bound_decoded']} / "
        f"{r['frames_total']} | {r['bound_speedup']:.2f}x | {r['identical']} |"
    )


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc={os.cpu_count()}, {model}, {platform.system()} {platform.release()}, PyAV {av.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the long video (b)")
    ap.add_argument("--short-seconds", type=float, default=30.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--gop-long", type=int, default=250)
    ap.add_argument("--gop-short", type=int, default=30)
    ap.add_argument(
        "--bframes-minutes", type=float, default=2.0, help="(c): veryfast x264 with B-frames; 0 = skip"
    )
    ap.add_argument(
        "--chunk", type=int, default=256, help="targets per decode_frames call (one clip's frames)"
    )
    ap.add_argument("--repeat", type=int, default=2, help="runs of each loader; the best CPU time counts")
    ap.add_argument("--write-results", action="store_true", help="append a section to bench/RESULTS.md")
    ap.add_argument("--keep", default=None, help="directory to keep/reuse the generated videos")
    a = ap.parse_args()
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="keye_bench_decode_"))
    tmp.mkdir(parents=True, exist_ok=True)
    bf = a.bframes_minutes
    cases = [
        (
            f"(a) 720p {a.short_seconds:g}s short GOP",
            tmp / f"short_g{a.gop_short}.mp4",
            a.short_seconds,
            a.gop_short,
        ),
        (
            f"(b) 720p {a.minutes:g} min GOP {a.gop_long}",
            tmp / f"long_g{a.gop_long}_{a.minutes:g}m.mp4",
            a.minutes * 60,
            a.gop_long,
        ),
    ]
    if bf > 0:
        cases.append(
            (
                f"(c) 720p {bf:g} min GOP {a.gop_long}, B-frames",
                tmp / f"bframes_g{a.gop_long}_{bf:g}m.mp4",
                bf * 60,
                a.gop_long,
            )
        )
    results = []
    for name, path, secs, gop in cases:
        if not path.exists():
            preset = "veryfast" if "B-frames" in name else "ultrafast"
            enc = make_video(path, secs, a.fps, gop, preset=preset)
            print(f"# encoded {path.name}: {enc:.1f} s, {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
        r = run_case(name, path, a.chunk, a.repeat)
        results.append(r)
        print(row(r), file=sys.stderr)
    lines = [HEADER, *(row(r) for r in results)]
    detail = []
    for r in results:
        detail.append(
            f"- {r['case']}: naive {r['naive_cpu_s']:.1f} CPU-s ({r['naive_wall_s']:.1f} s wall), decode_frames "
            f"{r['ours_cpu_s']:.1f} CPU-s ({r['ours_wall_s']:.1f} s wall; {r['chunk']} targets per call), {r['ours_seeks']} seeks, {r['ours_skipped']} non-reference packets skipped; per frame: decode "
            f"{r['decode_ms']:.2f} ms, RGB conversion {r['convert_ms']:.2f} ms, conversion + copy into a fresh output "
            f"{r['deliver_ms']:.2f} ms (CPU); cost bound {r['bound_cpu_s']:.1f} CPU-s = "
            f"{r['bound_decoded']} frames x decode + {r['delivered']} x (conversion + copy); "
            f"decode_frames reaches {100 * r['bound_cpu_s'] / r['ours_cpu_s']:.0f}% of the bound's speed."
        )
    print("\n".join(lines))
    print("\n".join(detail))
    if a.write_results:
        cmd = "python " + " ".join(sys.argv)
        section = [
            "## decode",
            "",
            f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Machine: {machine()}.",
            f"Command: `{cmd}`. Baseline (same run): plain PyAV, thread_type AUTO, decode every frame and convert "
            "every frame to an RGB ndarray, deliver the frames nearest the 2 fps plan, as arrays of --chunk frames like "
            "decode_frames. Frames/s/core = delivered "
            "frames / process CPU seconds (all threads), best of --repeat alternating runs. Load average at the "
            f"end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: expect run-to-run noise).",
            "",
            *lines,
            "",
            *detail,
            "",
            "The bound: the decoder cannot skip reference frames, so per GOP it must decode every reference frame "
            "from the keyframe up to the GOP's last target (plus non-reference targets). Sampling 2 fps from 30 fps "
            "puts a target every 15 frames, so a GOP of g >= 15 frames is decoded up to about g - 7 of its g frames "
            "(all but the tail after the last target): with g = 250 and no B-frames that is ~97% of all frames, and "
            "the best possible gain over the plain loader is only the RGB conversion of the 14 of 15 frames not "
            "delivered (and every loader pays for the delivered frames: conversion + copy into the output): "
            "bound speedup ~ (decode + convert) / (0.97 decode + (convert + copy) / 15), the `bound speedup` "
            "column, with the costs measured in this run. With a short GOP (a) whole GOPs after the last target "
            "are skipped by seeking; with B-frames (c) non-reference pictures between targets are never decoded. "
            ">= 3x on (b) needs RGB conversion to cost well over 2.5x the decode of a frame; with ultrafast H.264 "
            "(CAVLC, no deblocking) decoding is cheap, so the target is not reachable on (b) by any decoder that "
            "returns exact frames. decode_frames decoded "
            + "; ".join(
                f"{r['case'].split()[0]} {r['ours_decoded']} vs bound {r['bound_decoded']}" for r in results
            )
            + f" (above the bound only by the re-seek at the start of each {a.chunk}-target call and by keeping "
            "non-reference neighbours of targets).",
            "",
        ]
        res = Path(__file__).with_name("RESULTS.md")
        prev = res.read_text() if res.exists() else "# Benchmark results\n\n"
        res.write_text(prev.rstrip("\n") + "\n\n" + "\n".join(section))
        print(f"# appended to {res}", file=sys.stderr)


if __name__ == "__main__":
    main()
