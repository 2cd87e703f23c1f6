"""Loader: packed tensors vs a per-sample reference, resume at an arbitrary point, rank split, bad records."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from keye.data.loader import (
    PackLoader,
    PackStream,
    index_shard,
    open_loader,
    rank_packs,
    resolve_shards,
    scan_shard,
)
from keye.data.packing import PackBudget, pack, read_pack_index, write_pack_index
from keye.data.samples import build_sample, corpus_texts, recounter, sample_table
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe
from keye.model.patches import frame_patches as patchify

POLICY = SamplingPolicy(
    fps=2.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=4,
    total_token_budget=16,
    duration_scaling=False,
)  # 2 s clips -> 4 frames of 56x56 pixels = 4x4 patches = 2x2 merged tokens


def _mp4(seed: int, w: int = 64, h: int = 48, fps: int = 8, seconds: float = 2.0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": "4"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        rng = np.random.default_rng(seed)
        for i in range(int(fps * seconds)):
            img = np.full((h, w, 3), (seed * 40) % 255, np.uint8)
            img[:, (i * 4) % w :] = rng.integers(0, 255, 3, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _record(key: str, i: int) -> dict:
    return {
        "key": key,
        "clip_id": f"clip{i}",
        "duration": 2.0,
        "fps": 8.0,
        "width": 64,
        "height": 48,
        "split": "train",
        "caption": f"A shape number {i} moves to the right.",
        "dense_captions": [
            {"start": 0.0, "end": 1.0, "text": f"shape {i} appears"},
            {"start": 1.0, "end": 2.0, "text": f"shape {i} moves"},
        ],
        "grounding": [{"query": f"shape {i} moves", "start": 1.0, "end": 2.0}],
        "mcq": [
            {
                "question": q,
                "options": ["a", "b", "c", "d"],
                "answer": (i + k) % 4,
                "start": 0,
                "end": 2,
            }
            for k, q in enumerate(["What moved?", "What stayed?", "What else?"])
        ],
        "subtitles": [],
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("shards")
    records = []
    for s in range(2):
        with tarfile.open(d / f"shard-{s:06d}.tar", "w") as tar:
            for j in range(3):
                i = s * 3 + j
                key = f"c{i:016x}"
                rec = _record(key, i)
                records.append(rec)
                mp4 = b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20 if i == 4 else _mp4(i)
                _add(tar, f"{key}.json", json.dumps(rec).encode())
                _add(tar, f"{key}.mp4", mp4)
            if s == 1:
                _add(tar, "cffffffffffffffff.mp4", _mp4(9))  # a sample without its json
    tok = train_bpe(corpus_texts(records), vocab_size=600)
    scans = {p.name: scan_shard(p) for p in sorted(d.glob("*.tar"))}
    table = sample_table(
        ((name, rec) for name, sc in scans.items() for _, rec in sc.records), tok, POLICY, split="train"
    )
    res = pack(table, PackBudget(max_tokens=420, max_frames=10), seed=0)
    index_path = write_pack_index(res, d / "packs.parquet")
    return {"dir": d, "tok": tok, "scans": scans, "table": table, "res": res, "index_path": index_path}


def _all(loader: PackLoader, limit: int | None = None) -> list:
    out = []
    for b in loader:
        out.append(b)
        if limit is not None and len(out) >= limit:
            break
    return out


def test_scan_reports_missing_json(corpus: dict) -> None:
    sc = corpus["scans"]["shard-000001.tar"]
    assert [k for k, _ in sc.bad] == ["cffffffffffffffff"] and sc.bad[0][1] == "missing json"
    assert len(sc.records) == 3
    idx = index_shard(corpus["dir"] / "shard-000000.tar")
    assert set(idx.members["c0000000000000000"]) == {"json", "mp4"}
    with tarfile.open(corpus["dir"] / "shard-000000.tar") as tar:
        want = tar.extractfile("c0000000000000001.mp4").read()
    with idx.open("c0000000000000001", "mp4") as fh:  # random access without reading the member into memory
        assert fh.read() == want
        fh.seek(-10, io.SEEK_END)
        assert fh.read(100) == want[-10:] and fh.tell() == len(want)
        fh.seek(5)
        assert fh.read(7) == want[5:12]
    assert idx.open("c0000000000000001", "txt") is None


def test_patchify_matches_model_layout() -> None:
    from keye.model.patches import patchify as model_patchify

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 28, 56, 3), dtype=np.uint8)
    ours = patchify(frames)
    ref, grids = model_patchify(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), 14)
    assert torch.allclose(torch.from_numpy(ours), (ref / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert grids.tolist() == [[1, 2, 4], [1, 2, 4]]


def test_packs_match_per_sample_reference_and_bad_mp4_is_skipped(corpus: dict) -> None:
    from keye.model.rope import mrope_positions

    tok = corpus["tok"]
    loader = open_loader(corpus["index_path"], corpus["dir"], tok, POLICY)
    batches = _all(loader)
    records = {rec["key"]: rec for sc in corpus["scans"].values() for _, rec in sc.records}
    seen = [sid for b in batches for sid in b.sample_ids]
    all_ids = corpus["res"].index_table.column("sample_id").to_pylist()
    bad_ids = [s for s in all_ids if s.startswith("c0000000000000004:") and not s.endswith(":text:0")]
    assert sorted(seen + bad_ids) == sorted(
        all_ids
    )  # each good sample exactly once; text-only needs no video
    assert loader.bad_samples == len(bad_ids) > 0
    assert all("c0000000000000004" in sid for sid, _ in loader.bad_log)
    for b in batches:
        cu = b.cu_seqlens
        assert cu.dtype == torch.int32 and b.vision_cu_seqlens.dtype == torch.int32
        assert int(cu[-1]) == b.input_ids.shape[0] <= 420
        assert b.position_ids.shape == (3, b.input_ids.shape[0]) and b.position_ids.dtype == torch.int64
        frame = 0
        for j, sid in enumerate(b.sample_ids):
            key, task, item = sid.split(":")
            s = build_sample(tok, records[key], task, int(item), POLICY)
            lo, hi = int(cu[j]), int(cu[j + 1])
            assert torch.equal(b.input_ids[lo:hi], torch.from_numpy(s.input_ids))
            assert torch.equal(b.labels[lo:hi], torch.from_numpy(s.labels))
            gh, gw = s.patch_grid()
            ref = mrope_positions(
                torch.from_numpy(s.input_ids), tok.image_id, [(gh // 2, gw // 2)] * s.frames
            )
            assert torch.equal(b.position_ids[:, lo:hi], ref)  # restarts at 0 for every sample
            answer = tok.decode(b.input_ids[lo:hi][b.labels[lo:hi] != -100].tolist())
            assert answer and answer in tok.decode(s.input_ids.tolist())
            for _ in range(s.frames):
                assert b.patch_grids[frame].tolist() == [1, gh, gw]
                frame += 1
        assert frame == b.patch_grids.shape[0]
        n_patch = (b.patch_grids[:, 1] * b.patch_grids[:, 2]).tolist()
        assert b.vision_cu_seqlens.tolist() == np.cumsum([0, *n_patch]).tolist()
        assert b.pixel_patches.shape == (sum(n_patch), 3 * 14 * 14)
        assert int((b.input_ids == tok.image_id).sum()) == sum(n // 4 for n in n_patch)
    assert any(g == [1, 4, 4] for b in batches for g in b.patch_grids.tolist())  # 4x4 patches, 2x2 merged


@pytest.mark.parametrize(
    ("workers", "rank", "world", "shuffle"), [(0, 0, 1, False), (2, 0, 1, False), (2, 1, 2, True)]
)
def test_resume_yields_exactly_the_unseen_packs(
    corpus: dict, workers: int, rank: int, world: int, shuffle: bool
) -> None:
    tok = corpus["tok"]
    kw = dict(rank=rank, world_size=world, shuffle=shuffle, seed=7)
    full = [b.sample_ids for b in _all(open_loader(corpus["index_path"], corpus["dir"], tok, POLICY, **kw))]
    assert len(full) >= 3
    for cut in (1, len(full) - 2):
        first = open_loader(corpus["index_path"], corpus["dir"], tok, POLICY, num_workers=workers, **kw)
        head = [b.sample_ids for b in _all(first, limit=cut)]
        state = first.state_dict()
        second = open_loader(corpus["index_path"], corpus["dir"], tok, POLICY, num_workers=workers, **kw)
        second.load_state_dict(state)
        tail = [b.sample_ids for b in _all(second)]
        assert head + tail == full
        assert second.state_dict()["epoch"] == 1 and second.state_dict()["next"] == 0


def test_rank_split_disjoint_and_equal(corpus: dict) -> None:
    tok = corpus["tok"]
    n = PackStream(corpus["res"].index_table, resolve_shards(corpus["dir"]), tok, POLICY).n_packs
    for ws in (2, 3):
        per = [rank_packs(n, r, ws, seed=0, epoch=0, shuffle=True) for r in range(ws)]
        flat = np.concatenate(per)
        assert len(set(flat.tolist())) == flat.size == (n // ws) * ws
        assert len({p.size for p in per}) == 1
    ids = []
    for r in range(2):
        ld = open_loader(corpus["index_path"], corpus["dir"], tok, POLICY, rank=r, world_size=2)
        ids.append({b.pack_id for b in _all(ld)})
    assert not ids[0] & ids[1]
    assert len(ids[0] | ids[1]) >= (n // 2) * 2 - 2  # packs whose samples were all bad are not yielded
    other = open_loader(corpus["index_path"], corpus["dir"], tok, POLICY, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict({**ld.state_dict(), "rank": 0})


def test_missing_shard_is_a_bad_sample_not_a_crash(corpus: dict, tmp_path: Path) -> None:
    tok = corpus["tok"]
    shards = resolve_shards(corpus["dir"])
    shards = {k: v for k, v in shards.items() if "000000" not in k}
    stream = PackStream(corpus["res"].index_table, shards, tok, POLICY)
    loader = PackLoader(stream)
    got = [sid for b in _all(loader) for sid in b.sample_ids]
    assert all(not s.startswith(("c0000000000000000", "c0000000000000001", "c0000000000000002")) for s in got)
    assert loader.bad_samples >= 3 and any("not found" in why for _, why in loader.bad_log)


def test_frames_cut_by_the_pack_stage_are_loaded_cut(corpus: dict) -> None:
    tok = corpus["tok"]
    records = {(name, rec["key"]): rec for name, sc in corpus["scans"].items() for _, rec in sc.records}
    recount = recounter(corpus["table"], records, tok, POLICY)
    res = pack(corpus["table"], PackBudget(max_tokens=420, max_frames=2), seed=1, recount=recount)
    assert res.stats["n_truncated"] > 0
    path = write_pack_index(res, corpus["dir"] / "packs_cut.parquet")
    loader = open_loader(path, corpus["dir"], tok, POLICY)
    for b in _all(loader):
        assert b.patch_grids.shape[0] <= 2  # the frame budget holds in the loaded tensors
        assert int(b.cu_seqlens[-1]) <= 420
        rows = [r for r in res.index_table.to_pylist() if r["pack_id"] == b.pack_id]
        for r in rows:
            if r["sample_id"] in b.sample_ids:
                j = b.sample_ids.index(r["sample_id"])
                assert int(b.cu_seqlens[j + 1] - b.cu_seqlens[j]) == r["tokens"]  # exact, also when cut
                assert (
                    r["offset"] == int(b.cu_seqlens[j]) or b.bad
                )  # offsets hold unless a sample was skipped
                if r["frames_orig"] > r["frames"]:
                    assert r["frames"] == 2 and r["cut_reason"] == "dropped_frames:4->2"


def test_tiny_model_takes_a_loaded_pack(corpus: dict) -> None:
    from keye.model import build_model

    tok = corpus["tok"]
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=len(tok), image_token_id=tok.image_id)
    batch = next(
        b
        for b in _all(open_loader(corpus["index_path"], corpus["dir"], tok, POLICY))
        if b.patch_grids.numel()
    )
    out = model(**batch.model_inputs())
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_pack_shards_stage_end_to_end(corpus: dict, tmp_path: Path) -> None:
    from keye.data.packset import pack_shards

    tok = corpus["tok"]
    shards = {p.name: p for p in sorted(corpus["dir"].glob("*.tar"))}
    shards["shard-broken.tar"] = tmp_path / "broken.tar"
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:  # records the sample builder cannot use
        for key, rec in (
            ("c00000000000000a1", {**_record("c00000000000000a1", 1), "width": None}),
            ("c00000000000000a2", {**_record("c00000000000000a2", 2), "width": 1, "height": 1000}),
            ("c00000000000000a3", [1, 2, 3]),
        ):
            _add(tar, f"{key}.json", json.dumps(rec).encode())
            _add(tar, f"{key}.mp4", b"x")
    shards["shard-odd.tar"] = tmp_path / "odd.tar"
    res = pack_shards(
        shards, tok, POLICY, PackBudget(max_tokens=420, max_frames=2), tmp_path / "packs", seed=0
    )
    assert ("shard-000001.tar", "cffffffffffffffff", "missing json") in res.bad_records
    assert any(s == "shard-broken.tar" and "unreadable" in why for s, _, why in res.bad_records)
    reasons = {k: why for s, k, why in res.bad_records if s == "shard-odd.tar"}
    assert "lacks numeric ['width']" in reasons["c00000000000000a1"]
    assert "aspect ratio" in reasons["c00000000000000a2"] and "not an object" in reasons["c00000000000000a3"]
    assert res.stats["n_bad_records"] == 5 and res.stats["n_records"] == 7
    assert res.stats["tokenizer_sha256"] == tok.content_hash()
    assert res.index_path.is_file() and res.samples_path.is_file()
    loader = open_loader(res.index_path, shards, tok, POLICY)
    for b in _all(loader):
        rows = [r for r in read_pack_index(res.index_path).to_pylist() if r["pack_id"] == b.pack_id]
        by_id = {r["sample_id"]: r for r in rows}
        for j, sid in enumerate(b.sample_ids):
            assert int(b.cu_seqlens[j + 1] - b.cu_seqlens[j]) == by_id[sid]["tokens"]


def test_skip_empty_false_keeps_one_item_per_pack(corpus: dict) -> None:
    tok = corpus["tok"]
    shards = {k: v for k, v in resolve_shards(corpus["dir"]).items() if "000000" not in k}
    loader = PackLoader(PackStream(corpus["res"].index_table, shards, tok, POLICY), skip_empty=False)
    got = _all(loader)
    assert [b.local_index for b in got] == list(range(len(loader)))  # same step count on every rank
    for b in got:
        if not b.sample_ids:
            assert b.input_ids.shape == (0,) and b.cu_seqlens.tolist() == [0] and b.bad


@pytest.mark.parametrize("turns", [1, 3])
def test_option_answer_packs_load_as_counted(corpus: dict, tmp_path: Path, turns: int) -> None:
    """pack.mcq_answer=option (and mcq_turns): the loader rebuilds from the index's item exactly the samples the
    pack stage counted, and the MCQ answers are option texts, not letters."""
    from keye.data.packset import pack_shards

    tok = corpus["tok"]
    shards = {p.name: p for p in sorted(corpus["dir"].glob("*.tar"))}
    res = pack_shards(
        shards,
        tok,
        POLICY,
        PackBudget(max_tokens=420, max_frames=2),
        tmp_path / "packs",
        tasks=["mcq", "caption"],
        seed=0,
        mcq_orders=2,
        mcq_answer="option",
        mcq_turns=turns,
    )
    index = read_pack_index(res.index_path).to_pylist()
    answers, most_turns = set(), 0
    for b in _all(open_loader(res.index_path, shards, tok, POLICY)):
        by_id = {r["sample_id"]: r for r in index if r["pack_id"] == b.pack_id}
        for j, sid in enumerate(b.sample_ids):
            lo, hi = int(b.cu_seqlens[j]), int(b.cu_seqlens[j + 1])
            assert hi - lo == by_id[sid]["tokens"]
            if ":mcq:" in sid:
                lab = b.labels[lo:hi]
                said = tok.decode(lab[lab != -100].tolist(), skip_special_tokens=False).split("<|im_end|>")
                assert len(said) - 1 <= turns
                most_turns = max(most_turns, len(said) - 1)
                answers.update(a.strip() for a in said[:-1])
    assert answers and answers <= {"a", "b", "c", "d"}
    assert most_turns == turns


def test_a_cursor_saved_on_4_ranks_is_redealt_to_2_and_1_exactly() -> None:
    """With `unit` packs per optimizer step (world-independent), step s takes global positions [s*unit,
    (s+1)*unit) of the epoch's order on any world size dividing unit; a cursor saved by 4 ranks after 2 steps,
    re-dealt to 2 or 1 ranks, continues with exactly the packs (and their grouping into steps) of the
    uninterrupted 4-rank run, and the epoch ends where it would have."""
    from keye.data.loader import redeal

    n, unit, seed = 23, 4, 5

    def steps(world: int, nexts: list[int], epoch: int = 0) -> list[list[int]]:
        orders = [rank_packs(n, r, world, seed, epoch, True, unit) for r in range(world)]
        per = unit // world
        out, nxt = [], nexts[0]
        while nxt + per <= len(orders[0]):
            out.append(sorted(int(o[i]) for o in orders for i in range(nxt, nxt + per)))
            nxt += per
        return out

    full = steps(4, [0] * 4)
    assert len(full) == 5 and len({p for s in full for p in s}) == 20  # 23 packs cut to 5 steps of 4
    saved = [
        {"epoch": 0, "next": 2, "rank": r, "world_size": 4, "n_packs": n, "bad_samples": r} for r in range(4)
    ]
    for world in (2, 1):
        states = [redeal(saved, r, world, unit) for r in range(world)]
        assert all(st["next"] == 8 // world for st in states)
        assert sum(st["bad_samples"] for st in states) == 6
        assert steps(world, [st["next"] for st in states]) == full[2:]
    with pytest.raises(ValueError, match="do not re-deal to 3 ranks"):
        redeal(saved, 0, 3, 12)
    with pytest.raises(ValueError, match="disagree on next"):
        redeal([saved[0], {**saved[1], "next": 3}], 0, 2, unit)
    with pytest.raises(ValueError, match="do not deal evenly"):
        rank_packs(n, 0, 3, seed, 0, True, unit)
