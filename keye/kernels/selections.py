"""Top-k selections as a measured input of the DSA kernels: a generator with a chosen adjacent-query overlap and
local-window + sink share, and the statistics (overlap, locality) of any selection, e.g. a trained indexer's.

Why: the sparse kernels' speed depends on how much neighbouring queries' key sets overlap (a block of queries can
gather each shared row once) and on locality (L2 hits). Random selections are the worst case; a trained indexer's
are not random. Every DSA figure in bench/RESULTS.md is reported per overlap level made here.

Layout as in dsa_reference: packed causal batches (`cu_seqlens`), indices int32 [T, topk] global rows in ascending
order, -1 padding at the end; a token sees only keys of its own sample at or before itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _token_spans(cu_seqlens: Tensor, t_total: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(sample start a[t], position t - a[t]) for every row."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    rows = torch.arange(t_total, device=device)
    sample = torch.searchsorted(cu[1:], rows, right=True).clamp(max=max(0, cu.numel() - 2))
    a = cu[sample]
    return a, rows - a


def _sort_pad(idx: Tensor) -> Tensor:
    """Ascending per row with -1 (and duplicates, set to -1) at the end."""
    big = torch.iinfo(torch.int64).max
    x = torch.where(idx >= 0, idx, big).sort(dim=1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[:, 1:] = x[:, 1:] == x[:, :-1]
    x = torch.where(dup, big, x).sort(dim=1).values
    return torch.where(x == big, -1, x)


def overlap_keep_probability(overlap: float, topk: int, local: int, sink: int) -> float:
    """Chance that a far (non-local, non-sink) slot keeps its key from one token to the next so that neighbouring
    sets have mean Jaccard `overlap`: |A & B| = 2k J / (1 + J) = (local - 1) + sink + p * far."""
    far = topk - local - sink
    if overlap <= 0 or far <= 0:
        return 0.0
    inter = 2 * topk * overlap / (1 + overlap)
    return float(min(1.0, max(0.0, (inter - max(0, local - 1) - sink) / far)))


def synthetic_selections(
    cu_seqlens: Tensor,
    topk: int,
    overlap: float,
    local_share: float = 0.0,
    sink: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """int32 [T, topk] selections with mean adjacent Jaccard ~`overlap` (0 = independent random sets).

    A token whose window (t - a + 1 keys) is at most topk takes every key (as exact top-k does). Otherwise its set
    is: the `sink` first keys of its sample, the last round(local_share * topk) keys (itself included), and far
    keys in between, one per slot; each far slot keeps its key from the previous token with probability p
    (`overlap_keep_probability`) and otherwise draws a fresh uniform key among those visible at that token. Slots
    refresh all at once at the first token of a sample that needs them. Duplicates become -1 (rare: ~k^2 / 2n).
    Measure what you got with `selection_stats`.
    """
    dev = torch.device(device) if device is not None else cu_seqlens.device
    cu = cu_seqlens.to(dev)
    t_total = int(cu[-1])
    local = min(topk, int(round(local_share * topk)))
    sink = min(sink, topk - local)
    far = topk - local - sink
    a, pos = _token_spans(cu, t_total, dev)
    n = pos + 1  # keys visible
    rows = torch.arange(t_total, device=dev)
    out = torch.full((t_total, topk), -1, dtype=torch.int64, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    slots = torch.arange(topk, device=dev)
    full = n <= topk
    out = torch.where(full[:, None] & (slots[None, :] < n[:, None]), a[:, None] + slots[None, :], out)
    sparse = ~full
    if bool(sparse.any()):
        if sink:
            out[:, :sink] = torch.where(sparse[:, None], a[:, None] + slots[None, :sink], out[:, :sink])
        if local:
            lo = rows - local + 1
            out[:, sink : sink + local] = torch.where(
                sparse[:, None], lo[:, None] + slots[None, :local], out[:, sink : sink + local]
            )
        if far:
            p = overlap_keep_probability(overlap, topk, local, sink)
            first = sparse & (n == topk + 1)  # a sample's first sparse token: every slot refreshes
            refresh = torch.rand((t_total, far), generator=g, device=dev) >= p
            refresh |= first[:, None]
            stamp = torch.where(refresh, rows[:, None], torch.zeros_like(rows)[:, None])
            born = torch.cummax(stamp, dim=0).values  # token at which each slot drew its current key
            u = torch.rand((t_total, far), generator=g, device=dev)
            span = (n - local - sink).clamp(min=1)  # far keys visible at that token: [a + sink, t - local]
            pick = a[born] + sink + (u.gather(0, born) * span[born]).long().clamp(max=span[born] - 1)
            out[:, sink + local :] = torch.where(sparse[:, None], pick, out[:, sink + local :])
    return _sort_pad(out).to(torch.int32)


def _sorted_big(idx: Tensor) -> Tensor:
    big = torch.iinfo(torch.int64).max
    return torch.where(idx >= 0, idx.long(), big).sort(dim=1).values


def adjacent_jaccard(indices: Tensor, cu_seqlens: Tensor, max_pairs: int = 4096, seed: int = 0) -> float:
    """Mean |A & B| / |A | B| over up to `max_pairs` neighbouring tokens of one sample that both select keys
    (a seeded random subset when there are more; nan when there are none)."""
    t_total, topk = indices.shape
    dev = indices.device
    a, _ = _token_spans(cu_seqlens, t_total, dev)
    count = (indices >= 0).sum(1)
    pair = (a[1:] == a[:-1]) & (count[1:] > 0) & (count[:-1] > 0)
    cand = torch.nonzero(pair).flatten() + 1
    if cand.numel() > max_pairs:
        g = torch.Generator(device="cpu").manual_seed(seed)
        cand = cand[torch.randperm(cand.numel(), generator=g)[:max_pairs].to(dev)]
    if not cand.numel():
        return float("nan")
    big = torch.iinfo(torch.int64).max
    x = _sorted_big(indices[cand])
    y = _sorted_big(indices[cand - 1])
    at = torch.searchsorted(x, y).clamp(max=topk - 1)
    inter = ((x.gather(1, at) == y) & (y != big)).sum(1).double()
    union = count[cand].double() + count[cand - 1].double() - inter
    return float((inter / union.clamp(min=1)).mean())


def selection_stats(
    indices: Tensor,
    cu_seqlens: Tensor,
    window: int = 256,
    sink: int = 16,
    max_pairs: int = 4096,
    seed: int = 0,
) -> dict[str, float]:
    """Overlap and locality of a selection (any [T, topk] int32, -1 = none, anywhere in the row).

    jaccard: mean |A & B| / |A | B| over up to `max_pairs` neighbouring tokens of one sample (both with a set);
    local_share: selected keys within the last `window` keys of their token; sink_share: keys among the first
    `sink` of the sample; mean_distance: mean t - s; fill: selected / topk."""
    t_total, topk = indices.shape
    dev = indices.device
    a, _ = _token_spans(cu_seqlens, t_total, dev)
    rows = torch.arange(t_total, device=dev)
    valid = indices >= 0
    count = valid.sum(1)
    stats = {"jaccard": adjacent_jaccard(indices, cu_seqlens, max_pairs, seed)}
    dist = rows[:, None] - indices.long()
    n_sel = max(1, int(count.sum()))
    stats["local_share"] = float((valid & (dist < window)).sum()) / n_sel
    stats["sink_share"] = float((valid & (indices.long() - a[:, None] < sink)).sum()) / n_sel
    stats["mean_distance"] = float(torch.where(valid, dist, 0).sum()) / n_sel
    stats["fill"] = float(count.sum()) / max(1, t_total * topk)
    return stats


__all__ = ["adjacent_jaccard", "overlap_keep_probability", "selection_stats", "synthetic_selections"]
