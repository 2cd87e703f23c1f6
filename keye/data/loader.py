"""Streaming, resumable loader of packed sequences from WebDataset shards (tars of <key>.mp4 + <key>.json).

Why this shape: a pack mixes samples from many shards, so each worker indexes the tars once (member offsets) and
reads the members of a pack by random access, then decodes ONLY the frames of the sample's frame plan
(`keye.data.video.decode_frames`), tokenises with the one chat template (`keye.data.samples.build_sample`) and
concatenates samples into the packed layout the model takes (see keye/model/__init__.py):
input_ids/labels int64 [T], position_ids int64 [3, T] restarting per sample, cu_seqlens int32 [B+1],
pixel_patches float32 [N, 3*14*14], patch_grids int32 [n_frames, 3], vision_cu_seqlens int32 [n_frames+1].

Splitting and resume (as torchtitan / torchdata StatefulDataLoader do it, reimplemented with plain torch):
packs are dealt round-robin to ranks (equal counts: the tail is dropped so every rank takes the same number of
steps), then round-robin to DataLoader workers; torch's in-order DataLoader hands results back round-robin, so the
trainer sees the rank's packs in exactly their order. Every item carries its rank-local index; `PackLoader` counts
what the trainer has *received* (not what workers prefetched), so `state_dict()` saved with a checkpoint resumes
at exactly the next unseen pack. Bad samples (missing json/mp4, undecodable video) are skipped and counted; a pack
whose samples are all bad still comes out of the workers as an empty item so the ordering and the cursor stay
exact (`PackLoader` drops it, or hands it on with `skip_empty=False` so every rank takes the same number of steps).
Videos are decoded from the tar by random access (no copy of the mp4 in memory), and decoded frames are kept in a
small per-worker LRU (bounded in bytes) because the tasks of one clip tend to land in the same or nearby packs.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from keye.data.packing import read_pack_index
from keye.data.samples import BuiltSample, build_sample
from keye.data.sampling import SamplingPolicy
from keye.data.shard_index import ShardIndex, index_shard, scan_shard
from keye.data.tokenizer import KeyeTokenizer
from keye.data.video import decode_frames
from keye.model.patches import frame_patches
from keye.model.vision_tokens import PATCH

__all__ = [
    "PackLoader",
    "PackStream",
    "PackedBatch",
    "index_shard",
    "open_loader",
    "rank_packs",
    "redeal",
    "resolve_shards",
    "scan_shard",
    "ShardIndex",
]


def resolve_shards(shards: Mapping[str, str | os.PathLike[str]] | str | os.PathLike[str]) -> dict[str, str]:
    """Shard name -> tar path, from a mapping or a directory of *.tar (name = file name and stem both map)."""
    if isinstance(shards, Mapping):
        return {k: str(v) for k, v in shards.items()}
    out: dict[str, str] = {}
    for p in sorted(Path(shards).glob("*.tar")):
        out[p.name] = str(p)
        out[p.stem] = str(p)
    return out


# ------------------------------------------------------------------------------------------------ pack assembly
@dataclass
class PackedBatch:
    """One pack in the model's packed layout plus bookkeeping (which samples, which were skipped)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixel_patches: torch.Tensor
    patch_grids: torch.Tensor
    vision_cu_seqlens: torch.Tensor
    sample_ids: list[str]
    pack_id: int
    local_index: int  # position of this pack in the rank's order (the cursor unit)
    bad: list[tuple[str, str]]  # (sample_id, reason) skipped in this pack

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's packed forward."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "pixel_patches": self.pixel_patches,
            "patch_grids": self.patch_grids,
            "vision_cu_seqlens": self.vision_cu_seqlens,
        }


def collate_pack(samples: list[BuiltSample], frames: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Concatenate built samples (+ their decoded frames) into the packed tensors; positions restart per sample."""
    ids = [s.input_ids for s in samples]
    lens = np.asarray([0] + [a.shape[0] for a in ids], dtype=np.int64)
    grids: list[tuple[int, int, int]] = []
    patches: list[np.ndarray] = []
    for s, fr in zip(samples, frames, strict=True):
        if s.frames:
            gh, gw = s.patch_grid()
            grids.extend([(1, gh, gw)] * s.frames)
            patches.append(frame_patches(fr))
    vis_lens = np.asarray([0] + [g[1] * g[2] for g in grids], dtype=np.int64)
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, np.int64)),
        "labels": torch.from_numpy(
            np.concatenate([s.labels for s in samples]) if ids else np.zeros(0, np.int64)
        ),
        "position_ids": torch.from_numpy(
            np.concatenate([s.positions() for s in samples], axis=1) if ids else np.zeros((3, 0), np.int64)
        ),
        "cu_seqlens": torch.from_numpy(np.cumsum(lens).astype(np.int32)),
        "pixel_patches": torch.from_numpy(
            np.concatenate(patches) if patches else np.zeros((0, 3 * PATCH * PATCH), np.float32)
        ),
        "patch_grids": torch.tensor(grids, dtype=torch.int32).reshape(-1, 3),
        "vision_cu_seqlens": torch.from_numpy(np.cumsum(vis_lens).astype(np.int32)),
    }


def rank_packs(
    n_packs: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool, unit: int | None = None
) -> np.ndarray:
    """Pack ids of one rank in its order: (optionally shuffled per epoch) round-robin, equal count on every rank.

    The epoch's global order is the permutation cut to a multiple of `unit` (default: world_size); rank r takes
    its positions r, r + W, ... With unit = the packs of one optimizer step (a multiple of W), optimizer step s
    takes global positions [s * unit, (s + 1) * unit) on any world size dividing unit (see `redeal`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    unit = world_size if unit is None else unit
    if unit % world_size:
        raise ValueError(f"{unit} packs per step do not deal evenly to {world_size} ranks")
    order = np.arange(n_packs)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_packs)
    return order[: n_packs // unit * unit][rank::world_size]


def redeal(states: list[Mapping[str, int]], rank: int, world_size: int, unit: int) -> dict[str, int]:
    """This rank's loader state on `world_size` ranks from the states saved by the ranks of another world size
    (each list entry one old rank's state; duplicates of context-parallel ranks allowed).

    Exact because every rank of the old run had received the same number of packs `next` of the same epoch, so
    the global order's positions [0, next * W_old) were consumed; with unit (packs per optimizer step) fixed and
    dividing both world sizes, the new ranks continue at global position next * W_old: the remaining packs, their
    grouping into optimizer steps, and the epoch's length are those of the uninterrupted run."""
    first = states[0]
    for st in states:
        for k in ("epoch", "next", "world_size", "n_packs"):
            if int(st[k]) != int(first[k]):
                raise ValueError(f"loader states disagree on {k}: {int(st[k])} vs {int(first[k])}")
    consumed = int(first["next"]) * int(first["world_size"])
    if consumed % world_size:
        raise ValueError(
            f"{consumed} packs consumed by {first['world_size']} ranks do not re-deal to {world_size} ranks"
        )
    bad = sum(int(st.get("bad_samples", 0)) for st in {int(s["rank"]): s for s in states}.values())
    return {
        "epoch": int(first["epoch"]),
        "next": consumed // world_size,
        "rank": rank,
        "world_size": world_size,
        "n_packs": int(first["n_packs"]),
        "bad_samples": bad if rank == 0 else 0,
    }


class PackStream(IterableDataset):
    """Yields the packs of one rank, split across DataLoader workers, from local index `start` on."""

    def __init__(
        self,
        index: pa.Table,
        shards: Mapping[str, str],
        tokenizer: KeyeTokenizer,
        policy: SamplingPolicy,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        frame_cache_bytes: int = 256 << 20,
        unit: int | None = None,
    ) -> None:
        super().__init__()
        self.unit = unit  # rank_packs' unit: the epoch is cut to a multiple of it
        self.frame_cache_bytes = frame_cache_bytes
        self._frames: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._frames_bytes = 0
        self.index = index
        self.shards = dict(shards)
        self.tok = tokenizer
        self.policy = policy
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0
        packs = index.column("pack_id").to_numpy()
        self.n_packs = int(packs.max()) + 1 if packs.size else 0
        srt = np.argsort(packs, kind="stable")
        bounds = np.searchsorted(packs[srt], np.arange(self.n_packs + 1))
        self._rows = [srt[bounds[i] : bounds[i + 1]] for i in range(self.n_packs)]

    def _remember(self, ck: tuple[Any, ...], frames: np.ndarray) -> None:
        """LRU of decoded frames (bounded in bytes): tasks of one clip have near-equal sizes, so packing order
        puts them in the same or nearby packs and the clip is decoded once."""
        self._frames[ck] = frames
        self._frames_bytes += frames.nbytes
        while self._frames_bytes > self.frame_cache_bytes and self._frames:
            _, old = self._frames.popitem(last=False)
            self._frames_bytes -= old.nbytes

    def order(self) -> np.ndarray:
        return rank_packs(
            self.n_packs, self.rank, self.world_size, self.seed, self.epoch, self.shuffle, self.unit
        )

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order()
        cols = {
            c: self.index.column(c).to_pylist()
            for c in ("shard", "key", "task", "item", "frames", "frames_orig")
        }
        cache: dict[str, ShardIndex] = {}
        for local in range(self.start + wid, len(order), nw):
            yield self._build(int(order[local]), local, cols, cache)

    def _build(
        self, pack_id: int, local: int, cols: dict[str, list[Any]], cache: dict[str, ShardIndex]
    ) -> PackedBatch:
        built: list[BuiltSample] = []
        frames: list[np.ndarray] = []
        bad: list[tuple[str, str]] = []
        for r in self._rows[pack_id].tolist():
            shard, key, task, item = cols["shard"][r], cols["key"][r], cols["task"][r], int(cols["item"][r])
            sid = f"{key}:{task}:{item}"
            try:
                if shard not in cache:
                    if shard not in self.shards:
                        raise LookupError(f"shard {shard!r} not found")
                    cache[shard] = index_shard(self.shards[shard])
                sh = cache[shard]
                raw = sh.read(key, "json")
                if raw is None:
                    raise LookupError("missing json")
                rec = json.loads(raw)
                rec.setdefault("key", key)
                keep = int(cols["frames"][r]) if cols["frames"][r] < cols["frames_orig"][r] else None
                s = build_sample(self.tok, rec, task, item, self.policy, keep_frames=keep)
                if s.frames:
                    ck = (shard, key, tuple(s.timestamps), s.frame_size)
                    fr = self._frames.get(ck)
                    if fr is None:
                        member = sh.open(key, "mp4")
                        if member is None:
                            raise LookupError("missing mp4")
                        with member:
                            fr = decode_frames(member, s.timestamps, size=s.frame_size)
                        if fr.shape[0] != s.frames:
                            raise ValueError(f"decoded {fr.shape[0]} of {s.frames} frames")
                        self._remember(ck, fr)
                    else:
                        self._frames.move_to_end(ck)
                else:
                    fr = np.zeros((0, 0, 0, 3), np.uint8)
            except Exception as e:  # a bad sample must not kill a training run: skip it, report it
                bad.append((sid, f"{type(e).__name__}: {e}"))
                continue
            built.append(s)
            frames.append(fr)
        tensors = collate_pack(built, frames)
        return PackedBatch(
            **tensors,
            sample_ids=[s.sample_id for s in built],
            pack_id=pack_id,
            local_index=local,
            bad=bad,
        )


class PackLoader:
    """DataLoader over a PackStream with a checkpointable cursor. Iterate for one epoch of this rank's packs.

    state_dict() -> {"epoch", "next", "rank", "world_size", "n_packs", "bad_samples"}: `next` is the local index of
    the first pack the trainer has not received; load it into a fresh loader (same index, rank, world size) to
    continue with exactly the unseen packs. Items whose samples were all bad are counted and, with skip_empty
    (default), not yielded; under DDP pass skip_empty=False and step on the empty pack (zero loss) so all ranks
    take the same number of steps.
    """

    def __init__(
        self, stream: PackStream, num_workers: int = 0, prefetch_factor: int = 2, skip_empty: bool = True
    ) -> None:
        self.stream = stream
        self.skip_empty = skip_empty
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.next = 0
        self.bad_samples = 0
        self.bad_log: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.stream.order())

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.stream.epoch,
            "next": self.next,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "n_packs": self.stream.n_packs,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for k in ("rank", "world_size", "n_packs"):
            mine = getattr(self.stream, k)
            if int(state[k]) != mine:
                raise ValueError(f"loader state was saved with {k}={state[k]}, this loader has {k}={mine}")
        self.stream.epoch = int(state["epoch"])
        self.next = int(state["next"])
        self.bad_samples = int(state.get("bad_samples", 0))

    def __iter__(self) -> Iterator[PackedBatch]:
        self.stream.start = self.next
        kw: dict[str, Any] = {"batch_size": None, "num_workers": self.num_workers}
        if self.num_workers:
            kw["prefetch_factor"] = self.prefetch_factor
        dl = DataLoader(self.stream, **kw)
        for batch in dl:
            if batch.local_index != self.next:  # in-order round-robin guarantees this; fail loudly if not
                raise RuntimeError(
                    f"pack order broken: got local index {batch.local_index}, expected {self.next}"
                )
            self.next = batch.local_index + 1
            if batch.bad:
                self.bad_samples += len(batch.bad)
                self.bad_log.extend(batch.bad)
            if batch.sample_ids or not self.skip_empty:
                yield batch
        if self.next >= len(self):
            self.stream.epoch += 1
            self.next = 0


def open_loader(
    index_path: str | os.PathLike[str],
    shards: Mapping[str, str | os.PathLike[str]] | str | os.PathLike[str],
    tokenizer: KeyeTokenizer,
    policy: SamplingPolicy,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    frame_cache_bytes: int = 256 << 20,
    skip_empty: bool = True,
    unit: int | None = None,
) -> PackLoader:
    """A PackLoader over a pack index Parquet file and a shard directory (or name -> path mapping); `unit`: see
    rank_packs."""
    stream = PackStream(
        read_pack_index(index_path),
        resolve_shards(shards),
        tokenizer,
        policy,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        frame_cache_bytes=frame_cache_bytes,
        unit=unit,
    )
    return PackLoader(stream, num_workers=num_workers, skip_empty=skip_empty)
