"""Best-fit-decreasing packing of variable-length multimodal samples into fixed-length (up to 256K) sequences.

Why: long-video training mixes 2-hour videos with 5-second clips and text; padding or splitting wastes compute
and breaks attention boundaries. Best-fit decreasing (BFD) under two budgets (LM tokens per pack, and visual tokens
and/or frames per pack, which bound ViT memory) keeps packs ~full without ever splitting a sample.

Follows the classic BFD bin-packing heuristic (Johnson 1973), the packing problem as posed for LM training by
Krell et al. 2021 ("Efficient Sequence Packing without Cross-contamination"), and the vector bin-packing idea of
comparing normalised sizes for the second budget; reimplemented for numpy without a compiler:

* items are sorted once (decreasing tokens, then visual tokens, then frames; ties shuffled by `seed`);
* open packs live in buckets keyed by their exact remaining capacity, and a two-level bitmap over the
  capacities (Python ints: 64-bit words plus one summary int of C/64 bits) answers "smallest remaining
  capacity >= s" with a constant number of int operations -- the job of a segment tree, with C = max_tokens;
  deletions are lazy (an entry is live while it equals the pack's current key);
* consecutive identical items are placed as one run: a pack that is the best fit for an item stays the best fit
  for its identical successor until it is full, so a run of k equal items costs one query per pack it touches.
  On a heavy-tailed mix this collapses 1M items into a few hundred thousand loop steps.
Overall O(n log n) for the sort plus O(1) index operations per loop step.

A sample longer than a budget is never split: it is cut by dropping frames (evenly, keeping an even count, the
reason recorded) or rejected, per `PackBudget.oversize`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keye.core.atomic import atomic_path

MAX_SEQ_LEN = 262_144
_BIG = 1 << 62  # "no budget" for the secondary resources


@dataclass(frozen=True)
class PackBudget:
    """Per-pack limits. Visual budgets are optional (None = unlimited)."""

    max_tokens: int = MAX_SEQ_LEN
    max_visual_tokens: int | None = None
    max_frames: int | None = None
    oversize: Literal["drop_frames", "reject"] = "drop_frames"
    min_frames: int = 2  # a cut video keeps at least this many frames, else it is rejected

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_SEQ_LEN:
            raise ValueError(f"max_tokens must be in [1, {MAX_SEQ_LEN}], got {self.max_tokens}")
        for name in ("max_visual_tokens", "max_frames"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.oversize not in ("drop_frames", "reject"):
            raise ValueError(f"oversize must be 'drop_frames' or 'reject', got {self.oversize!r}")
        if self.min_frames < 1:
            raise ValueError("min_frames must be >= 1")


@dataclass
class FitResult:
    """Samples after applying the budgets to each sample alone (before packing)."""

    tokens: np.ndarray  # int64 [n] tokens after any frame dropping
    visual_tokens: np.ndarray  # int64 [n]
    frames: np.ndarray  # int64 [n] frames kept
    keep: np.ndarray  # bool [n] False = rejected
    reason: list[str]  # per sample: "" | "dropped_frames:<from>-><to>" | "rejected:<why>"


def fit_to_budget(
    tokens: np.ndarray, visual_tokens: np.ndarray, frames: np.ndarray, budget: PackBudget
) -> FitResult:
    """Make every sample fit one empty pack: drop frames evenly (equal tokens per frame assumed) or reject.

    Visual tokens of a sample are `frames * tokens_per_frame`; text tokens are the rest and are never cut.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    vis = np.asarray(visual_tokens, dtype=np.int64)
    fr = np.asarray(frames, dtype=np.int64)
    n = tokens.shape[0]
    if vis.shape != (n,) or fr.shape != (n,):
        raise ValueError("tokens, visual_tokens and frames must be 1-D arrays of equal length")
    if (tokens < 1).any() or (vis < 0).any() or (fr < 0).any() or (vis > tokens).any():
        raise ValueError("need tokens >= 1, 0 <= visual_tokens <= tokens, frames >= 0")
    if ((fr == 0) & (vis > 0)).any():
        raise ValueError("a sample with visual tokens must have frames > 0")
    vcap = budget.max_visual_tokens if budget.max_visual_tokens is not None else _BIG
    fcap = budget.max_frames if budget.max_frames is not None else _BIG
    over = (tokens > budget.max_tokens) | (vis > vcap) | (fr > fcap)
    keep = np.ones(n, dtype=bool)
    out_t, out_v, out_f = tokens.copy(), vis.copy(), fr.copy()
    reason = [""] * n
    for i in np.flatnonzero(over).tolist():
        t, v, f = int(tokens[i]), int(vis[i]), int(fr[i])
        text = t - v
        if f == 0 or text > budget.max_tokens:
            keep[i] = False
            reason[i] = "rejected:text_longer_than_budget"
            continue
        if budget.oversize == "reject":
            keep[i] = False
            reason[i] = "rejected:oversize"
            continue
        tpf = max(1, -(-v // f))  # ceil: an upper bound, so the cut sample surely fits
        k = min(f, (budget.max_tokens - text) // tpf, vcap // tpf, fcap)
        k -= k % 2  # even frame count, as the frame plan requires
        if k < budget.min_frames:
            keep[i] = False
            reason[i] = "rejected:too_few_frames_after_cut"
            continue
        new_v = min(v, k * tpf)
        out_t[i], out_v[i], out_f[i] = text + new_v, new_v, k
        reason[i] = f"dropped_frames:{f}->{k}"
    return FitResult(out_t, out_v, out_f, keep, reason)


class _CapacityIndex:
    """Open packs bucketed by exact remaining token capacity, with a two-level bitmap for successor queries.

    A bucket is an insertion-ordered dict used as a set, so the most recently touched pack is taken first.
    """

    __slots__ = ("low", "top", "buckets")

    def __init__(self, capacity: int) -> None:
        self.low = [0] * ((capacity >> 6) + 2)
        self.top = 0
        self.buckets: dict[int, dict[int, None]] = {}

    def add(self, c: int, b: int) -> None:
        d = self.buckets.get(c)
        if d is not None:
            d[b] = None
            return
        self.buckets[c] = {b: None}
        w = c >> 6
        if not self.low[w]:
            self.top |= 1 << w
        self.low[w] |= 1 << (c & 63)

    def _clear(self, c: int) -> None:
        del self.buckets[c]
        w = c >> 6
        self.low[w] &= ~(1 << (c & 63))
        if not self.low[w]:
            self.top &= ~(1 << w)

    def remove(self, c: int, b: int) -> None:
        d = self.buckets[c]
        del d[b]
        if not d:
            self._clear(c)

    def take(self, s: int, key_of: list[int]) -> int:
        """Pop a pack from the smallest bucket >= s, or -1; entries with key_of[b] != bucket are stale (lazy delete)."""
        buckets = self.buckets
        while True:
            c = self.successor(s)
            if c < 0:
                return -1
            d = buckets[c]
            while d:
                b = d.popitem()[0]
                if key_of[b] == c:
                    if not d:
                        self._clear(c)
                    return b
            self._clear(c)
            s = c

    def successor(self, s: int) -> int:
        """Smallest capacity >= s that holds an open pack, or -1."""
        w = s >> 6
        if w >= len(self.low):
            return -1
        x = self.low[w] >> (s & 63)
        if x:
            return s + ((x & -x).bit_length() - 1)
        t = self.top >> (w + 1)
        if not t:
            return -1
        w += (t & -t).bit_length()
        x = self.low[w]
        return (w << 6) + ((x & -x).bit_length() - 1)


def best_fit_decreasing(
    tokens: np.ndarray,
    visual_tokens: np.ndarray | None = None,
    frames: np.ndarray | None = None,
    *,
    max_tokens: int = MAX_SEQ_LEN,
    max_visual_tokens: int | None = None,
    max_frames: int | None = None,
    seed: int = 0,
    max_scan: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign each sample to a pack; every sample must already fit an empty pack (see `fit_to_budget`).

    Text-only samples (and every sample when no secondary budget is set) get exact best fit: the open pack with
    the least token room that holds them (tested equal to textbook BFD). Samples with visual tokens/frames under
    a secondary budget get best fit on a normalised scale: the pack whose tightest room min(rem, vrem*C/V,
    frem*C/F) is the least that covers the sample's largest need max(s, v*C/V, f*C/F) -- always feasible, found
    by one successor query. Being conservative, it may miss a pack that fits; then up to `max_scan` packs by
    token room are checked directly before a new pack is opened. Packs leave the visual index for good once
    their visual/frame room is below the smallest visual sample still to come.

    Returns (pack_of int64 [n], order int64 [n]): `order` is the placement order (decreasing size), so members of
    a pack listed in `order` appear largest first. Pack ids are dense, numbered in order of opening.
    """
    t = np.asarray(tokens, dtype=np.int64)
    n = t.shape[0]
    v = np.zeros(n, np.int64) if visual_tokens is None else np.asarray(visual_tokens, dtype=np.int64)
    f = np.zeros(n, np.int64) if frames is None else np.asarray(frames, dtype=np.int64)
    vcap = _BIG if max_visual_tokens is None else int(max_visual_tokens)
    fcap = _BIG if max_frames is None else int(max_frames)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if t.min() < 1 or t.max() > max_tokens or v.max() > vcap or f.max() > fcap:
        raise ValueError("a sample exceeds an empty pack's budget or has no tokens: run fit_to_budget first")
    if max_visual_tokens is None:
        v = np.zeros(n, np.int64)  # an unlimited budget never constrains: treat as absent
    if max_frames is None:
        f = np.zeros(n, np.int64)

    # One sort: decreasing (tokens, visual, frames); a seeded shuffle first makes ties deterministic per seed.
    perm = np.random.default_rng(seed).permutation(n)
    key = np.lexsort((-f[perm], -v[perm], -t[perm]))
    order = perm[key]
    ts, vs, fs = t[order], v[order], f[order]
    change = np.ones(n, dtype=bool)
    change[1:] = (ts[1:] != ts[:-1]) | (vs[1:] != vs[:-1]) | (fs[1:] != fs[:-1])
    starts = np.flatnonzero(change)
    counts = np.diff(np.append(starts, n))
    # Smallest visual / frame demand among the visual runs still to come (suffix minimum; _BIG when none).
    rv, rf = vs[starts], fs[starts]
    is_vis = (rv > 0) | (rf > 0)
    vmin = np.minimum.accumulate(np.where(is_vis, rv, _BIG)[::-1])[::-1]
    fmin = np.minimum.accumulate(np.where(is_vis, rf, _BIG)[::-1])[::-1]

    smallest = int(ts[-1])  # packs with less token room than this can never take another sample
    # Visual samples compare rooms normalised to the token scale: a pack's key is its tightest room
    # min(rem, vrem*C/V, frem*C/F) (floored) and a sample's demand its largest need (ceiled), so any pack whose key
    # covers the demand fits under every budget, and the successor query returns it without a scan.
    # Both indexes delete lazily: an entry (key, pack) is live only while it equals the pack's current key.
    cap = max_tokens
    all_idx = _CapacityIndex(cap)  # every live pack by token room (text-only samples: exact best fit)
    vn_idx = _CapacityIndex(cap)  # packs that may take a visual sample, by normalised tightest room
    all_buckets = all_idx.buckets
    vscale = None if max_visual_tokens is None else vcap
    fscale = None if max_frames is None else fcap
    rem: list[int] = []
    vrem: list[int] = []
    frem: list[int] = []
    akey: list[int] = []  # token room while the pack is in all_idx, else -1
    nkey: list[int] = []  # normalised key while the pack is in vn_idx, else -1
    out_pack: list[int] = []
    out_len: list[int] = []
    demand = ts[starts].copy()
    if vscale is not None:
        demand = np.maximum(demand, -((-rv * cap) // vscale))
    if fscale is not None:
        demand = np.maximum(demand, -((-rf * cap) // fscale))
    runs = zip(
        ts[starts].tolist(),
        rv.tolist(),
        rf.tolist(),
        counts.tolist(),
        is_vis.tolist(),
        demand.tolist(),
        vmin.tolist(),
        fmin.tolist(),
        strict=True,
    )
    for s, vv, ff, k, visual, dem, vlo, flo in runs:
        while k:
            if not visual:
                b = all_idx.take(s, akey)
            else:
                b = vn_idx.take(dem, nkey)
                if b < 0:
                    # the normalised key is conservative: scan the tightest packs by token room for a real fit
                    scanned = 0
                    c = all_idx.successor(s)
                    while c >= 0 and b < 0 and scanned < max_scan:
                        for cand in reversed(all_buckets[c]):
                            if akey[cand] == c and vrem[cand] >= vv and frem[cand] >= ff:
                                b = cand
                                break
                            scanned += 1
                            if scanned >= max_scan:
                                break
                        if b >= 0:
                            all_idx.remove(c, b)
                        else:
                            c = all_idx.successor(c + 1)
            if b < 0:
                b = len(rem)
                rem.append(max_tokens)
                vrem.append(vcap)
                frem.append(fcap)
                akey.append(-1)
                nkey.append(-1)
            m = min(k, rem[b] // s)
            if vv:
                m = min(m, vrem[b] // vv)
            if ff:
                m = min(m, frem[b] // ff)
            r = rem[b] - m * s
            rem[b] = r
            vr = vrem[b] - m * vv
            vrem[b] = vr
            fr = frem[b] - m * ff
            frem[b] = fr
            out_pack.append(b)
            out_len.append(m)
            k -= m
            if r >= smallest:
                akey[b] = r
                all_idx.add(r, b)
                if vr >= vlo and fr >= flo:
                    key = r
                    if vscale is not None:
                        key = min(key, vr * cap // vscale)
                    if fscale is not None:
                        key = min(key, fr * cap // fscale)
                    nkey[b] = key
                    vn_idx.add(key, b)
                else:
                    nkey[b] = -1
            else:
                akey[b] = -1
                nkey[b] = -1
    pack_sorted = np.repeat(np.asarray(out_pack, dtype=np.int64), np.asarray(out_len, dtype=np.int64))
    pack_of = np.empty(n, dtype=np.int64)
    pack_of[order] = pack_sorted
    return pack_of, order


def first_fit_arrival(tokens: np.ndarray, *, max_tokens: int = MAX_SEQ_LEN, block: int = 256) -> np.ndarray:
    """Baseline: arrival-order first-fit (each sample into the lowest-numbered pack with room), tokens only.

    Packs are grouped in blocks with a per-block max remaining capacity, so a query scans blocks, then one block.
    """
    t = np.asarray(tokens, dtype=np.int64)
    if t.size and (t.min() < 1 or t.max() > max_tokens):
        raise ValueError("a sample exceeds max_tokens")
    rem = np.zeros(0, dtype=np.int64)
    bmax = np.zeros(0, dtype=np.int64)
    n_packs = 0
    pack_of = np.empty(t.shape[0], dtype=np.int64)
    for i, s in enumerate(t.tolist()):
        hits = np.flatnonzero(bmax >= s)
        if hits.size:
            blk = int(hits[0])
            lo = blk * block
            j = lo + int(np.argmax(rem[lo : lo + block] >= s))
        else:
            j = n_packs
            n_packs += 1
            if j >= rem.shape[0]:
                grow = max(block, rem.shape[0])
                rem = np.concatenate([rem, np.zeros(grow, np.int64)])
                bmax = np.concatenate([bmax, np.zeros(grow // block, np.int64)])
            rem[j] = max_tokens
            blk = j // block
            lo = blk * block
        rem[j] -= s
        bmax[blk] = rem[lo : lo + block].max()
        pack_of[i] = j
    return pack_of


def fill_ratio(tokens: np.ndarray, pack_of: np.ndarray, max_tokens: int) -> float:
    """Real tokens / (packs * max_tokens)."""
    n_packs = int(pack_of.max()) + 1 if pack_of.size else 0
    return float(np.asarray(tokens, np.int64).sum()) / (n_packs * max_tokens) if n_packs else 0.0


# Columns a sample table must carry for `pack` (samples.py builds it); extra columns are carried through.
SAMPLE_COLUMNS: tuple[str, ...] = ("sample_id", "tokens", "visual_tokens", "frames")


@dataclass
class PackResult:
    """What the pack stage returns: the member index (one row per packed sample) and stats for MLflow/lineage."""

    index_table: pa.Table
    rejected: pa.Table
    stats: dict[str, float | int | dict[str, int]] = field(default_factory=dict)


INDEX_SCHEMA_VERSION = "keye.packs/v1"


def pack(
    samples: pa.Table,
    budget: PackBudget,
    seed: int = 0,
    recount: Callable[[int, int], tuple[int, int]] | None = None,
) -> PackResult:
    """Pack a sample table into sequences; the index lists members in order with their token offsets.

    `samples` needs SAMPLE_COLUMNS (tokens include visual tokens); other columns (shard, key, task, item, ...)
    are copied into the index. `recount(row, kept_frames) -> (tokens, visual_tokens)` gives exact counts for
    samples cut by dropping frames (the cut estimate is an upper bound). Index columns added: pack_id, member (position in pack), offset (first token in
    the pack), tokens/visual_tokens/frames after any cut, frames_orig, cut_reason.
    """
    missing = [c for c in SAMPLE_COLUMNS if c not in samples.column_names]
    if missing:
        raise ValueError(f"sample table lacks columns {missing}")
    t0 = time.perf_counter()
    tok = samples.column("tokens").to_numpy().astype(np.int64)
    vis = samples.column("visual_tokens").to_numpy().astype(np.int64)
    fr = samples.column("frames").to_numpy().astype(np.int64)
    fit = fit_to_budget(tok, vis, fr, budget)
    if recount is not None:  # exact counts of cut samples (their per-frame timestamp text went too)
        for i in np.flatnonzero(fit.keep & (fit.frames != fr)).tolist():
            t_new, v_new = recount(i, int(fit.frames[i]))
            if t_new > fit.tokens[i] or v_new > fit.visual_tokens[i]:
                raise ValueError(f"recount of row {i} grew the sample ({t_new} > {fit.tokens[i]} tokens)")
            fit.tokens[i], fit.visual_tokens[i] = t_new, v_new
    kept = np.flatnonzero(fit.keep)
    pack_of_k, order_k = best_fit_decreasing(
        fit.tokens[kept],
        fit.visual_tokens[kept],
        fit.frames[kept],
        max_tokens=budget.max_tokens,
        max_visual_tokens=budget.max_visual_tokens,
        max_frames=budget.max_frames,
        seed=seed,
    )
    # Rows ordered by (pack, placement order); offsets are the running sum of tokens inside each pack.
    rows = kept[order_k]
    packs = pack_of_k[order_k]
    srt = np.argsort(packs, kind="stable")
    rows, packs = rows[srt], packs[srt]
    t_rows = fit.tokens[rows]
    csum = np.cumsum(t_rows) - t_rows
    first = np.ones(rows.shape[0], dtype=bool)
    first[1:] = packs[1:] != packs[:-1]
    start_idx = np.maximum.accumulate(np.where(first, np.arange(rows.shape[0]), 0))
    offsets = csum - csum[start_idx]
    member = np.arange(rows.shape[0]) - start_idx
    reasons = np.asarray(fit.reason, dtype=object)
    index = samples.take(pa.array(rows))
    index = index.drop_columns(
        [c for c in ("tokens", "visual_tokens", "frames", "text_tokens") if c in index.column_names]
    )
    index = index.append_column("frames_orig", pa.array(fr[rows], pa.int64()))
    for name, arr, typ in (
        ("pack_id", packs, pa.int64()),
        ("member", member, pa.int32()),
        ("offset", offsets, pa.int64()),
        ("tokens", t_rows, pa.int64()),
        ("visual_tokens", fit.visual_tokens[rows], pa.int64()),
        ("frames", fit.frames[rows], pa.int64()),
        ("text_tokens", t_rows - fit.visual_tokens[rows], pa.int64()),
    ):
        index = index.append_column(name, pa.array(arr, typ))
    index = index.append_column("cut_reason", pa.array(reasons[rows].tolist(), pa.string()))
    rej_rows = np.flatnonzero(~fit.keep)
    rejected = samples.take(pa.array(rej_rows, pa.int64())).select(
        [c for c in samples.column_names if c not in ("visual_tokens", "frames")]
    )
    rejected = rejected.append_column("reason", pa.array(reasons[rej_rows].tolist(), pa.string()))
    wall = time.perf_counter() - t0
    n_packs = int(packs.max()) + 1 if packs.size else 0
    per_pack = np.bincount(packs, minlength=n_packs) if n_packs else np.zeros(0, np.int64)
    reason_counts: dict[str, int] = {}
    for r in reasons[(~fit.keep) | (fit.frames != fr)].tolist():
        kind = r if r.startswith("rejected") else "dropped_frames"
        reason_counts[kind] = reason_counts.get(kind, 0) + 1
    stats: dict[str, float | int | dict[str, int]] = {
        "n_samples": int(samples.num_rows),
        "n_packed": int(rows.shape[0]),
        "n_packs": n_packs,
        "n_rejected": int(rej_rows.shape[0]),
        "n_truncated": int(((fit.frames != fr) & fit.keep).sum()),
        "tokens_packed": int(t_rows.sum()),
        "fill_ratio": float(t_rows.sum() / (n_packs * budget.max_tokens)) if n_packs else 0.0,
        "samples_per_pack_mean": float(per_pack.mean()) if n_packs else 0.0,
        "samples_per_pack_max": int(per_pack.max()) if n_packs else 0,
        "wall_s": wall,
        "reasons": reason_counts,
        "budget": {k: v for k, v in asdict(budget).items() if v is not None},  # type: ignore[dict-item]
        "seed": seed,
    }
    return PackResult(index_table=index, rejected=rejected, stats=stats)


def write_pack_index(result: PackResult, path: str | Path) -> Path:
    """Write the pack index as Parquet atomically (stats go in the file's key-value metadata too)."""
    import json

    stats = {k: v for k, v in result.stats.items() if k != "wall_s"}  # a timing would make the bytes differ
    meta = {b"keye.schema": INDEX_SCHEMA_VERSION.encode(), b"keye.stats": json.dumps(stats).encode()}
    table = result.index_table.replace_schema_metadata({**(result.index_table.schema.metadata or {}), **meta})
    final = Path(path)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp)
    return final


def read_pack_index(path: str | Path) -> pa.Table:
    """Read a pack index written by `write_pack_index`, checking its schema tag."""
    table = pq.read_table(path)
    tag = (table.schema.metadata or {}).get(b"keye.schema", b"").decode()
    if tag != INDEX_SCHEMA_VERSION:
        raise ValueError(f"{path}: not a pack index of {INDEX_SCHEMA_VERSION} (schema tag {tag!r})")
    return table


def pack_members(index: pa.Table) -> list[Sequence[int]]:
    """Row numbers of the index grouped by pack id, in member order (the loader's unit of work)."""
    packs = index.column("pack_id").to_numpy()
    if packs.size == 0:
        return []
    bounds = np.flatnonzero(np.diff(packs)) + 1
    return [g.tolist() for g in np.split(np.arange(packs.size), bounds)]
