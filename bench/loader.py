"""Bench: packed tokens/s per worker core of the streaming loader on synthetic shards.

Builds synthetic WebDataset shards in a temp dir (moving-pattern H.264 clips, short GOP, 224x168 @ 8 fps, as the
shard stage writes them), trains the BPE, builds the sample table, packs, then times full passes of
`keye.data.loader` with 0 workers (the main process does the work: one core) and with N workers.
Reported: packed tokens/s and tokens/s per worker core, with and without the decoded-frame cache.

    python bench/loader.py [--clips 48] [--seconds 8] [--seq-len 4096] [--workers 2]
    python bench/loader.py --default-run    # tokenizer + pack stage + a loader pass at the default pipeline's size
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from keye.data.loader import open_loader, scan_shard
from keye.data.packing import PackBudget, pack, write_pack_index
from keye.data.samples import corpus_texts, sample_table
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe


def _clip(seed: int, w: int, h: int, fps: int, seconds: float) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(fps)})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(int(fps * seconds)):
            img = ((xx + 3 * i) ^ (yy + seed)) & 255
            img = np.stack([img, (img * 3) & 255, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _record(key: str, i: int, seconds: float, w: int, h: int) -> dict:
    third = seconds / 3
    return {
        "key": key,
        "duration": seconds,
        "fps": 8.0,
        "width": w,
        "height": h,
        "split": "train",
        "caption": f"Pattern {i} scrolls to the left while noise flickers.",
        "dense_captions": [
            {"start": 0.0, "end": third, "text": f"pattern {i} starts"},
            {"start": third, "end": seconds, "text": f"pattern {i} keeps scrolling"},
        ],
        "grounding": [{"query": f"pattern {i} starts", "start": 0.0, "end": third}],
        "mcq": [
            {
                "question": "What moves?",
                "options": ["pattern", "circle", "square", "text"],
                "answer": 0,
                "start": 0.0,
                "end": seconds,
            }
        ],
    }


def default_pipeline_run(workdir: Path, seq_len: int = 2048) -> None:
    """Time the tokenizer + pack stage + one loader pass at the size of the default pipeline: the synthetic set
    (40 short videos + 1 ten-minute video, keye.datasets.synthetic), each video one clip re-encoded by
    keye.data.shards at max side 224, a tiny frame policy (1 fps, 4-16 frames, 4-16 tokens per frame)."""
    from keye.data.packset import pack_shards
    from keye.data.shards import encode_clip, write_shard
    from keye.datasets.synthetic import generate_dataset

    t0 = time.perf_counter()
    vids = generate_dataset(workdir / "videos", n_videos=40, n_long=1, seed=0, workers=1)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = []
    for i, v in enumerate(vids):
        side = json.loads(v.with_suffix(".json").read_text())
        key = f"c{i:016x}"
        info = encode_clip(v, 0.0, side["duration"], workdir / "clips" / f"{key}.mp4", max_side=224)
        fields = ("caption", "dense_captions", "grounding", "mcq", "subtitles", "split")
        rec = {k: side.get(k) for k in fields}
        rec.update(
            key=key, clip_id=key, duration=info.duration, fps=info.fps, width=info.width, height=info.height
        )
        samples.append((key, workdir / "clips" / f"{key}.mp4", rec))
    shards = {}
    for j in range(0, len(samples), 16):
        si = write_shard(workdir / "shards", f"shard-{j // 16:06d}", samples[j : j + 16])
        shards[Path(si.path).name] = si.path
    t_enc = time.perf_counter() - t0
    policy = SamplingPolicy(
        fps=1.0,
        min_frames=4,
        max_frames=16,
        min_tokens_per_frame=4,
        max_tokens_per_frame=16,
        total_token_budget=256,
        duration_scaling=False,
    )
    t0 = time.perf_counter()
    recs = [r for p in shards.values() for _, r in scan_shard(p).records]
    tok = train_bpe(corpus_texts(recs), vocab_size=2048)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = pack_shards(shards, tok, policy, PackBudget(max_tokens=seq_len, max_frames=64), workdir / "packs")
    t_pack = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_tok = sum(int(b.input_ids.shape[0]) for b in open_loader(res.index_path, shards, tok, policy))
    t_load = time.perf_counter() - t0
    st = res.stats
    print(f"default-size run: generate {t_gen:.1f} s, encode+shard {t_enc:.1f} s (other stages, for scale)")
    print("| stage | wall s | result |")
    print("|---|---|---|")
    print(f"| train BPE (vocab {len(tok)}) | {t_tok:.2f} | sha256 {tok.content_hash()[:12]} |")
    print(
        f"| pack_shards (seq {seq_len}) | {t_pack:.2f} | {st['n_samples']} samples -> {st['n_packs']} packs, fill "
        f"{st['fill_ratio']:.3f}, rejected {st['n_rejected']} {st['reasons']} |"
    )
    print(f"| one loader pass, 0 workers | {t_load:.2f} | {n_tok} tokens, {n_tok / t_load:,.0f} tokens/s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--default-run", action="store_true", help="time the stages at the default pipeline's size"
    )
    args = ap.parse_args()
    if args.default_run:
        with tempfile.TemporaryDirectory() as tmp:
            default_pipeline_run(Path(tmp))
        return
    w, h = 224, 168
    policy = SamplingPolicy(
        fps=2.0,
        min_frames=4,
        max_frames=16,
        min_tokens_per_frame=16,
        max_tokens_per_frame=64,
        total_token_budget=1024,
        duration_scaling=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        records = []
        t0 = time.perf_counter()
        for s in range(0, args.clips, 8):
            with tarfile.open(d / f"shard-{s // 8:06d}.tar", "w") as tar:
                for i in range(s, min(s + 8, args.clips)):
                    key = f"c{i:016x}"
                    rec = _record(key, i, args.seconds, w, h)
                    records.append(rec)
                    for name, data in (
                        (f"{key}.json", json.dumps(rec).encode()),
                        (f"{key}.mp4", _clip(i, w, h, 8, args.seconds)),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        make_s = time.perf_counter() - t0
        tok = train_bpe(corpus_texts(records), vocab_size=1024)
        scans = {p.name: scan_shard(p) for p in sorted(d.glob("*.tar"))}
        table = sample_table(((n, r) for n, sc in scans.items() for _, r in sc.records), tok, policy)
        res = pack(table, PackBudget(max_tokens=args.seq_len), seed=0)
        index = write_pack_index(res, d / "packs.parquet")
        print(
            f"shards: {args.clips} clips x {args.seconds:.0f} s, {w}x{h} @ 8 fps (made in {make_s:.1f} s); "
            f"{res.stats['n_packed']} samples in {res.stats['n_packs']} packs of {args.seq_len}, "
            f"fill {res.stats['fill_ratio']:.3f}"
        )
        print(
            "| workers | frame cache | packs | tokens | frames out | wall s | tokens/s | tokens/s per worker core |"
        )
        print("|---|---|---|---|---|---|---|---|")
        runs = [(0, 0), (0, 256 << 20), (args.workers, 256 << 20)]
        for workers, cache in runs[1:2] if os.environ.get("BENCH_PROFILE") else runs:
            loader = open_loader(index, d, tok, policy, num_workers=workers, frame_cache_bytes=cache)
            t0 = time.perf_counter()
            n_tok = n_frames = n_packs = 0
            for b in loader:
                n_tok += int(b.input_ids.shape[0])
                n_frames += int(b.patch_grids.shape[0])
                n_packs += 1
            wall = time.perf_counter() - t0
            cores = max(1, workers)
            print(
                f"| {workers} | {'on' if cache else 'off'} | {n_packs} | {n_tok} | {n_frames} | {wall:.2f} | "
                f"{n_tok / wall:,.0f} | {n_tok / wall / cores:,.0f} |"
            )
        print(f"cpu cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
