"""Query-block selections for DSA in plain torch: the block-shared mode's top-k (one key set per query block, from
the block's pooled indexer query, NSA / MoBA style) and the union of a block's per-token selections; with the
reference of block-sparse attention over them (the spec of keye/kernels/block_sparse_attention.py).

Why blocks: a key row gathered once serves block x G query rows (a compute-bound tensor-core tile) instead of the G
heads of one token, and the backward sums dK/dV over the block before its atomics.

Block-shared lists are a block's top-k earlier keys followed by its own rows (attended causally), so every token
sees at least itself. Layout: blocks never straddle samples: each sample of `cu_seqlens` is cut into blocks of `block` tokens (the last
one shorter); `bstart` int32 [NB+1] gives block b's rows [bstart[b], bstart[b+1]). A block's key list `bidx`
[NB, U] int32 (global rows, ascending, -1 padding) holds keys of its sample at or before its last row; token t of
the block attends to the listed keys s <= t (block-shared), or to those whose bit is set in its row of the
membership mask `bits` int32 [T, ceil(U/32)] (union of token selections: bit j of word j // 32 = slot j).
"""

from __future__ import annotations

import torch
from torch import Tensor

from keye.kernels.dsa_reference import (
    cache_sparse_attention,
    decode_index_scores,
    sparse_attention_reference,
    topk_lowest_index_ties,
)
from keye.kernels.selections import adjacent_jaccard


def block_layout(cu_seqlens: Tensor, block: int) -> Tensor:
    """bstart int32 [NB+1]: each sample cut into blocks of `block` rows."""
    if block < 1:
        raise ValueError(f"dsa block size must be >= 1, got {block}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    starts: list[int] = []
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        starts.extend(range(a, b, block))
    starts.append(cu[-1] if cu else 0)
    return torch.tensor(starts, dtype=torch.int32, device=cu_seqlens.device)


def _block_of_rows(bstart: Tensor, t_total: int) -> Tensor:
    rows = torch.arange(t_total, device=bstart.device)
    return (torch.searchsorted(bstart[1:].long(), rows, right=True)).clamp(max=max(0, bstart.numel() - 2))


def pooled_queries(
    q_idx: Tensor, w: Tensor, cu_seqlens: Tensor, bstart: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per block: (mean indexer query [NB, H_I, D_I] in q_idx.dtype, mean weights f32 [NB, H_I], first scored key
    int32 [NB] (its sample's start), end of its scored keys int32 [NB] (its own first row: earlier keys only))."""
    t_total, h_i, d_i = q_idx.shape
    nb = bstart.numel() - 1
    dev = q_idx.device
    cu = cu_seqlens.to(dev).long()
    bs = bstart.to(dev).long()
    sample_start = cu[torch.searchsorted(cu[1:], bs[:-1], right=True)]
    lens = (bs[1:] - bs[:-1]).clamp(min=1)
    blk = _block_of_rows(bstart.to(dev), t_total)
    with torch.no_grad():
        qsum = torch.zeros((nb, h_i, d_i), device=dev, dtype=torch.float32).index_add_(0, blk, q_idx.float())
        wsum = torch.zeros((nb, h_i), device=dev, dtype=torch.float32).index_add_(0, blk, w.float())
    qb = (qsum / lens[:, None, None]).to(q_idx.dtype).contiguous()
    return qb, (wsum / lens[:, None]).contiguous(), sample_start.to(torch.int32), bs[:-1].to(torch.int32)


def own_block_rows(bstart: Tensor, block: int) -> Tensor:
    """int32 [NB, block]: each block's own rows (ascending, -1 past its end), appended to its selected keys."""
    bs = bstart.long()
    j = torch.arange(block, device=bs.device)
    rows = bs[:-1, None] + j[None, :]
    return torch.where(rows < bs[1:, None], rows, -1).to(torch.int32)


def block_topk(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, cu_seqlens: Tensor, topk: int, block: int, chunk: int = 128
) -> tuple[Tensor, Tensor]:
    """Block-shared selection: (bidx int32 [NB, topk + block], bstart int32 [NB+1]).

    Block b pools its tokens' indexer queries and weights (means over the block: q_b, w_b) and scores the earlier
    keys of its sample (before its first row): I_b[s] = sum_j w_b[j] relu(q_b[j] . k_idx[s] / sqrt(D_I)); its list
    is the top-k of those (all of them if fewer; ties to the smaller row), ascending, -1 padded, then its own rows
    (`own_block_rows`), which each token attends causally: every token sees at least itself (MoBA's current block).
    The pooling costs `block` times fewer index-score FLOPs than the per-token indexer. `chunk` blocks are scored
    per matmul (bounds the [chunk, H_I, window] slab)."""
    bstart = block_layout(cu_seqlens, block)
    nb = bstart.numel() - 1
    dev = q_idx.device
    out = torch.full((nb, topk), -1, dtype=torch.int32, device=dev)
    if nb == 0:
        return torch.cat([out, own_block_rows(bstart.to(dev), block)], 1), bstart
    d_i = q_idx.shape[2]
    qb, wb, sample_start, first = pooled_queries(q_idx, w, cu_seqlens, bstart)
    sample_start, first = sample_start.long(), first.long()
    with torch.no_grad():
        host_a = sample_start.tolist()
        host_end = first.tolist()
        for c0 in range(0, nb, chunk):
            c1 = min(nb, c0 + chunk)
            lo, hi = min(host_a[c0:c1]), max(host_end[c0:c1])
            if hi <= lo or topk == 0:
                continue
            s = torch.einsum("bjd,sd->bjs", qb[c0:c1].float(), k_idx[lo:hi].float()) * d_i**-0.5
            scores = (wb[c0:c1, :, None] * torch.relu(s)).sum(1)  # [C, window]
            keys = torch.arange(lo, hi, device=dev)
            vis = (keys[None, :] >= sample_start[c0:c1, None]) & (keys[None, :] < first[c0:c1, None])
            scores = scores.masked_fill(~vis, float("-inf"))
            kk = min(topk, hi - lo)
            vals, cols = topk_lowest_index_ties(scores, kk)  # ascending; ReLU ties to the smaller row
            big = torch.iinfo(torch.int64).max
            cols = torch.where(torch.isfinite(vals), cols + lo, big).sort(dim=1).values
            out[c0:c1, :kk] = torch.where(cols == big, -1, cols).to(torch.int32)
    return torch.cat([out, own_block_rows(bstart.to(dev), block)], 1), bstart


def expand_block_indices(bidx: Tensor, bstart: Tensor, t_total: int) -> Tensor:
    """Per-token indices [T, U] of block-shared selections: token t keeps its block's keys s <= t (-1 elsewhere)."""
    blk = _block_of_rows(bstart, t_total)
    rows = torch.arange(t_total, device=bidx.device)
    idx = bidx[blk].long()
    return torch.where((idx >= 0) & (idx <= rows[:, None]), idx, -1).to(torch.int32)


def union_of_selections(indices: Tensor, bstart: Tensor) -> tuple[Tensor, Tensor]:
    """Per block, the union of its tokens' selected keys and each token's membership bits: (uidx int32 [NB, U]
    ascending with -1 padding, bits int32 [T, ceil(U/32)]). U = the largest union (at least 1)."""
    t_total, topk = indices.shape
    dev = indices.device
    nb = bstart.numel() - 1
    bs = bstart.long()
    lens = bs[1:] - bs[:-1]
    bmax = int(lens.max()) if nb else 1
    big = torch.iinfo(torch.int64).max
    # [NB, bmax * topk] of the block's selections (slot r * topk + j = token bstart + r, its j-th key)
    r = torch.arange(bmax, device=dev)
    tok = bs[:-1, None] + r[None, :]
    tok_ok = r[None, :] < lens[:, None]
    flat = indices[tok.clamp(max=max(0, t_total - 1))].long()  # [NB, bmax, topk]
    flat = torch.where(tok_ok[:, :, None] & (flat >= 0), flat, big).reshape(nb, bmax * topk)
    sorted_keys, order = flat.sort(dim=1)
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    new &= sorted_keys != big
    upos = torch.cumsum(new.long(), dim=1) - 1  # union slot of each sorted element
    u = max(1, int(new.sum(1).max()) if nb else 1)
    uidx = torch.full((nb, u), -1, dtype=torch.int64, device=dev)
    bi, ci = torch.nonzero(new, as_tuple=True)
    uidx[bi, upos[bi, ci]] = sorted_keys[bi, ci]
    words = (u + 31) // 32
    acc = torch.zeros((t_total, words), dtype=torch.int64, device=dev)
    keep = sorted_keys != big
    bi, ci = torch.nonzero(keep, as_tuple=True)
    src_tok = bs[bi] + order[bi, ci] // topk
    slot = upos[bi, ci]
    acc.view(-1).index_add_(0, src_tok * words + slot // 32, torch.ones_like(slot) << (slot % 32))
    bits = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)
    return uidx.to(torch.int32), bits


def union_token_indices(uidx: Tensor, bits: Tensor, bstart: Tensor) -> Tensor:
    """Per-token indices [T, U] read back from a union and its membership bits (-1 where the bit is clear)."""
    t_total = bits.shape[0]
    blk = _block_of_rows(bstart, t_total)
    u = uidx.shape[1]
    slots = torch.arange(u, device=uidx.device)
    on = ((bits.long()[:, slots // 32] >> (slots % 32)[None, :]) & 1).bool()
    idx = uidx[blk].long()
    return torch.where(on & (idx >= 0), idx, -1).to(torch.int32)


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, bidx: Tensor, bstart: Tensor, scale: float, bits: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(o [T, Hq, D], lse f32 [T, Hq]) of attention over block key lists: causal within the list (bits=None,
    block-shared) or the membership bits (union of token selections). Equals sparse_attention_reference over the
    per-token sets these imply."""
    t_total = q.shape[0]
    if bits is None:
        idx = expand_block_indices(bidx, bstart, t_total)
    else:
        idx = union_token_indices(bidx, bits, bstart)
    return sparse_attention_reference(q, k, v, idx, scale)


def block_decode_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_pool: Tensor,
    k_idx_cache: Tensor,
    w_pool: Tensor,
    cache_lens: Tensor,
    topk: int,
    block: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step in block-shared selection: the new token (row cache_lens[b] - 1 of sequence b) attends to
    the top-k keys before its block's first row, scored by the block's pooled indexer query (q_pool [B, H_I, D_I],
    w_pool [B, H_I]: the means over the block's rows so far, the new one included), then to its block's own rows up
    to itself: the rule of `block_topk` with the pool limited to the rows that exist (a prefill's blocks pool the
    whole block). Blocks start at multiples of `block` from each sequence's row 0, as `block_layout` cuts a sample.
    Returns (o [B, Hq, D] in q.dtype, lse f32 [B, Hq], indices int32 [B, topk + block] cache rows, -1 = unused)."""
    pos = cache_lens.long() - 1
    first = pos - pos % block  # the block's first row: keys before it are scored, its own rows are appended
    vals, cols = topk_lowest_index_ties(decode_index_scores(q_pool, k_idx_cache, w_pool, first), topk)
    picked = torch.where(torch.isfinite(vals), cols, -1)
    own = first[:, None] + torch.arange(block, device=first.device)[None, :]
    own = torch.where(own <= pos[:, None], own, -1)
    indices = torch.cat([picked, own.to(picked.device)], dim=1).to(torch.int32)
    o, lse = cache_sparse_attention(q, k_cache, v_cache, indices, scale)
    return o, lse, indices


def adjacent_overlap(indices: Tensor, cu_seqlens: Tensor, pairs: int = 64) -> float:
    """Cheap run-time estimate of the mean adjacent Jaccard (evenly spaced pairs): the dispatch's choice of path."""
    return adjacent_jaccard(indices, cu_seqlens, max_pairs=pairs)


__all__ = [
    "adjacent_overlap",
    "block_decode_reference",
    "block_layout",
    "block_sparse_attention_reference",
    "block_topk",
    "expand_block_indices",
    "own_block_rows",
    "pooled_queries",
    "union_of_selections",
    "union_token_indices",
]
