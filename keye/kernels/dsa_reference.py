"""Plain-torch reference of DeepSeek Sparse Attention (DSA) on GQA, for packed (varlen) sequences.

Follows the DeepSeek-V3.2-Exp report and its inference/model.py (lightning indexer, top-k selection, sparse
attention, indexer KL), adapted to GQA as in Keye-VL-2.0: one selected key set per query token, shared by every
query head; each KV group attends over it.

This file is the spec the Triton kernels are tested against and the CPU path of the model. Layout everywhere:
tokens flattened to T rows, samples delimited by int32 `cu_seqlens` [B+1]; a token sees only earlier-or-equal
tokens of its own sample. Nothing here materialises more than a (block x L) slab of scores; under autograd each
slab is recomputed in backward (activation checkpointing), so memory stays bounded at long context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements of one gathered K (or V) chunk in the sparse path: bounds memory to ~64 MB per tensor in float32.
_GATHER_BUDGET = 1 << 24


def sample_bounds(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """(start, end) row range of each sample; host-side list so loops stay in python ints."""
    cu = cu_seqlens.tolist()
    return [(int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]


def _query_blocks(cu_seqlens: Tensor, block: int) -> Iterator[tuple[int, int, int]]:
    """(sample start a, query start q0, query end q1): the keys of such a block are rows a..q1-1."""
    block = max(1, int(block))
    for a, b in sample_bounds(cu_seqlens):
        for q0 in range(a, b, block):
            yield a, q0, min(q0 + block, b)


def _acc(x: Tensor) -> Tensor:
    """Accumulation precision: float32 for 16/32-bit inputs, float64 kept (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _maybe_checkpoint(fn: Callable[..., object], *args: object, grad: bool) -> object:
    """Recompute `fn` in backward instead of keeping its slab alive: the memory bound of the reference path."""
    if grad:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _causal_mask(a: int, q0: int, q1: int, device: torch.device) -> Tensor:
    """Bool [q1-q0, q1-a]: True where key row s (a <= s < q1) is visible to query row t (s <= t)."""
    t = torch.arange(q0, q1, device=device)[:, None]
    s = torch.arange(a, q1, device=device)[None, :]
    return s <= t


# ----------------------------------------------------------------------------------------------- indexer
def indexer_scores_block(q_idx: Tensor, k_idx: Tensor, w: Tensor, a: int, q0: int, q1: int) -> Tensor:
    """Index scores I[t, s] for queries q0..q1-1 against keys a..q1-1 of their sample; float32 (float64 inputs stay float64), -inf where s > t.

    Heads are accumulated one at a time so the live slab is (q1-q0) x (q1-a), never x H_I.
    """
    d_i = q_idx.shape[-1]
    scale = d_i**-0.5
    q = _acc(q_idx[q0:q1])  # [Bq, H, D]
    k = _acc(k_idx[a:q1])  # [L, D]
    wq = _acc(w[q0:q1])  # [Bq, H]
    scores = q.new_zeros(q1 - q0, q1 - a)
    for j in range(q.shape[1]):
        scores = scores + wq[:, j, None] * torch.relu((q[:, j] @ k.T) * scale)
    return scores.masked_fill(~_causal_mask(a, q0, q1, q.device), float("-inf"))


def topk_lowest_index_ties(scores: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """Top-k per row with ties broken by the smaller column, listed in ascending column order (deterministic).

    torch.topk leaves the choice among ties unspecified; ReLU makes exact ties (often 0) common, and a kernel must
    be comparable to this, so: take the k-th value as threshold, keep everything above it and the first columns
    equal to it. Ascending column order is what a selection kernel emits without sorting (and what the sparse
    gathers like best).
    """
    rows, cols = scores.shape
    if cols < topk:
        scores = torch.cat([scores, scores.new_full((rows, topk - cols), float("-inf"))], dim=1)
        cols = topk
    kth = torch.topk(scores, topk, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = scores > kth
    equal = scores == kth
    need = topk - above.sum(dim=1, keepdim=True)
    keep = above | (equal & (torch.cumsum(equal.to(torch.int32), dim=1) <= need))
    # ascending column order within each row; -inf columns (after the row's causal end, or padding) come last
    cols_kept = keep.nonzero()[:, 1].view(rows, topk)
    return torch.gather(scores, 1, cols_kept), cols_kept


def indexer_topk_reference(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    cu_seqlens: Tensor,
    topk: int,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Lightning-indexer top-k selection for every token of a packed batch.

    q_idx [T, H_I, D_I] indexer queries (RoPE applied); k_idx [T, D_I] one indexer key per token (LayerNorm + RoPE
    applied); w [T, H_I] per-head weights (already scaled by 1/sqrt(H_I)).
    I[t,s] = sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s] * D_I**-0.5) over s in t's sample with s <= t.
    Returns (indices int32 [T, topk], scores float32 [T, topk]): global row ids of the top-k keys (ties broken by
    the smaller index) in ascending index order, then -1 and -inf where fewer than topk keys are visible.
    """
    t_total = q_idx.shape[0]
    indices = torch.full((t_total, topk), -1, dtype=torch.int32, device=q_idx.device)
    scores_out = torch.full((t_total, topk), float("-inf"), dtype=torch.float32, device=q_idx.device)
    with torch.no_grad():
        for a, q0, q1 in _query_blocks(cu_seqlens, block):
            scores = indexer_scores_block(q_idx, k_idx, w, a, q0, q1)
            vals, cols = topk_lowest_index_ties(scores, topk)
            valid = torch.isfinite(vals)
            indices[q0:q1] = torch.where(valid, cols + a, -1).to(torch.int32)
            scores_out[q0:q1] = vals
    return indices, scores_out


# ----------------------------------------------------------------------------------------------- attention
def _sparse_chunk(q: Tensor, kh: Tensor, vh: Tensor, idx: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of a chunk of queries q [C, Hq, D] over their own gathered key rows idx [C, topk], one KV group
    at a time (batched matmuls over the chunk's tokens); kh, vh are K, V head-major [Hkv, T, D]."""
    hq = q.shape[1]
    hkv = kh.shape[0]
    g = hq // hkv
    valid = idx >= 0  # [C, K]
    rows = idx.clamp(min=0).long()
    outs, lses = [], []
    for h in range(hkv):
        kk = _acc(kh[h][rows])  # [C, K, D]
        vv = _acc(vh[h][rows])
        qq = _acc(q[:, h * g : (h + 1) * g])  # [C, G, D]
        s = torch.bmm(qq, kk.transpose(1, 2)) * scale  # [C, G, K]
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [C, G]
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        outs.append(torch.bmm(torch.exp(s - safe[..., None]), vv))
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    scale: float,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sparse GQA attention over per-token selected keys.

    q [T, Hq, D]; k, v [T, Hkv, D] (Hq % Hkv == 0, G = Hq // Hkv); indices int32 [T, topk] global row ids,
    -1 = unused. o[t,h] = softmax(scale * q[t,h] . k[S_t, h//G]) v[S_t, h//G].
    Returns (o [T, Hq, D] in q.dtype, lse float32 [T, Hq] (float64 for float64 inputs)); a row with no valid index gives o = 0, lse = -inf.
    `block` = tokens per chunk (default: sized so one gathered K chunk of one KV head holds ~16M elements).
    """
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    topk = indices.shape[1]
    chunk = block or max(1, _GATHER_BUDGET // max(1, topk * d))
    grad = _needs_grad(q, k, v)
    kh, vh = (
        k.transpose(0, 1).contiguous(),
        v.transpose(0, 1).contiguous(),
    )  # head-major: contiguous row gathers
    outs, lses = [], []
    for c0 in range(0, t_total, chunk):
        c1 = min(c0 + chunk, t_total)
        o, lse = _maybe_checkpoint(_sparse_chunk, q[c0:c1], kh, vh, indices[c0:c1], scale, grad=grad)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros((0, hq), dtype=torch.float32)
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


def _dense_block(
    q: Tensor, k: Tensor, v: Tensor, a: int, q0: int, q1: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Causal attention of queries q0..q1-1 over keys a..q1-1, one KV head at a time (slab G*Bq x L)."""
    hq = q.shape[1]
    hkv = k.shape[1]
    g = hq // hkv
    mask = _causal_mask(a, q0, q1, q.device)  # [Bq, L]
    outs, lses = [], []
    for h in range(hkv):
        qq = _acc(q[q0:q1, h * g : (h + 1) * g])  # [Bq, G, D]
        kk = _acc(k[a:q1, h])  # [L, D]
        vv = _acc(v[a:q1, h])
        s = torch.einsum("bgd,ld->bgl", qq, kk) * scale
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [Bq, G]; finite: the diagonal is always visible
        p = torch.exp(s - lse[..., None])
        outs.append(torch.einsum("bgl,ld->bgd", p, vv))
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def dense_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    scale: float,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Causal per-sample GQA attention, chunked over queries; returns (o [T,Hq,D] in q.dtype, lse f32 [T,Hq]).

    A block holds max(1, block // G) queries of one KV group, so the live slab is at most block x L.
    """
    t_total, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    g = hq // hkv
    grad = _needs_grad(q, k, v)
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    spans: list[tuple[int, int]] = []
    for a, q0, q1 in _query_blocks(cu_seqlens, max(1, block // g)):
        ob, lb = _maybe_checkpoint(_dense_block, q, k, v, a, q0, q1, scale, grad=grad)
        outs.append(ob)
        lses.append(lb)
        spans.append((q0, q1))
    if spans and spans == sorted(spans) and spans[0][0] == 0 and spans[-1][1] == t_total:
        return torch.cat(outs).to(q.dtype), torch.cat(lses)
    o = q.new_zeros((t_total, hq, d), dtype=torch.float32)  # cu_seqlens not covering all rows
    lse = q.new_full((t_total, hq), float("-inf"), dtype=torch.float32)
    for (q0, q1), ob, lb in zip(spans, outs, lses, strict=True):
        o[q0:q1] = ob
        lse[q0:q1] = lb
    return o.to(q.dtype), lse


# ----------------------------------------------------------------------------------------------- indexer loss
def _kl_block(
    q: Tensor,
    k: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    idx_block: Tensor | None,
    a: int,
    q0: int,
    q1: int,
    scale: float,
) -> Tensor:
    """Sum over queries q0..q1-1 of KL(p_t || softmax(I_t)); p_t from the main attention, detached."""
    with torch.no_grad():
        hq = q.shape[1]
        hkv = k.shape[1]
        g = hq // hkv
        mask = _causal_mask(a, q0, q1, q.device)
        if idx_block is not None:
            valid = idx_block >= 0
            cols = (idx_block.long() - a).clamp(min=0)
        p = None
        for h in range(hkv):
            s = torch.einsum("bgd,ld->bgl", _acc(q[q0:q1, h * g : (h + 1) * g]), _acc(k[a:q1, h])) * scale
            s = s.masked_fill(~mask[:, None, :], float("-inf"))
            if idx_block is not None:
                s = torch.gather(s, 2, cols[:, None, :].expand(-1, g, -1))
                s = s.masked_fill(~valid[:, None, :], float("-inf"))
            ph = torch.softmax(s, dim=-1).sum(dim=1)
            p = ph if p is None else p + ph
        p = p / p.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    logits = indexer_scores_block(q_idx, k_idx, w, a, q0, q1)
    if idx_block is not None:
        logits = torch.gather(logits, 1, cols).masked_fill(~valid, float("-inf"))
    log_q = torch.log_softmax(logits, dim=-1)
    log_q = torch.where(torch.isfinite(log_q), log_q, torch.zeros_like(log_q))
    return (torch.xlogy(p, p) - p * log_q).sum()


def indexer_kl_reference(
    q: Tensor,
    k: Tensor,
    cu_seqlens: Tensor,
    scale: float,
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    indices: Tensor | None,
    block: int = 1024,
) -> Tensor:
    """DSA indexer loss: mean over tokens of KL(p_t || softmax(I_t)).

    p_t = main-attention probabilities (q [T,Hq,D], k [T,Hkv,D], `scale`) summed over heads, L1-normalised; I_t the
    index scores of `indexer_topk_reference`. indices=None: dense warm-up target over all visible keys; else
    int32 [T, topk] and both p and I are restricted (and renormalised) to the selected set.
    Differentiable w.r.t. q_idx, k_idx, w only (the target is detached). The gradient w.r.t. the index logits of
    token t is (softmax(I_t) * sum(p_t) - p_t) / T.
    """
    t_total = q.shape[0]
    g = q.shape[1] // k.shape[1]
    grad = _needs_grad(q_idx, k_idx, w)
    total = _acc(q_idx.new_zeros(()))
    for a, q0, q1 in _query_blocks(cu_seqlens, max(1, block // g)):
        idx_block = None if indices is None else indices[q0:q1]
        part = _maybe_checkpoint(
            _kl_block, q.detach(), k.detach(), q_idx, k_idx, w, idx_block, a, q0, q1, scale, grad=grad
        )
        total = total + part
    return total / max(1, t_total)


# ----------------------------------------------------------------------------------------------- decode
def decode_index_scores(q_idx: Tensor, k_idx_cache: Tensor, w: Tensor, cache_lens: Tensor) -> Tensor:
    """I [B, S] of each sequence's new token over its cached indexer keys (S = max cache_lens; -inf past a row's
    length). q_idx [B, H_I, D_I]; k_idx_cache [B, L, D_I]; w [B, H_I]; cache_lens int [B] (new token included)."""
    span = int(cache_lens.max())
    keys = _acc(k_idx_cache[:, :span])
    d_i = keys.shape[-1]
    scores = torch.einsum("bjd,bsd->bjs", _acc(q_idx), keys) * d_i**-0.5
    scores = (_acc(w)[:, :, None] * torch.relu(scores)).sum(dim=1)
    pos = torch.arange(span, device=scores.device)
    return scores.masked_fill(pos[None, :] >= cache_lens[:, None].to(pos.device), float("-inf"))


def dsa_decode_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_idx: Tensor,
    k_idx_cache: Tensor,
    w: Tensor,
    cache_lens: Tensor,
    topk: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DSA decode step: q [B, Hq, D]; k_cache, v_cache [B, L, Hkv, D]; q_idx [B, H_I, D_I]; k_idx_cache
    [B, L, D_I]; w [B, H_I]; cache_lens int [B] = valid cache rows per sequence, the new token's row included.
    Returns (o [B, Hq, D] in q.dtype, lse float32 [B, Hq], indices int32 [B, topk] cache rows, -1 = unused),
    with the same selection rule as `indexer_topk_reference` (ties to the smaller row, ascending row order)."""
    vals, cols = topk_lowest_index_ties(decode_index_scores(q_idx, k_idx_cache, w, cache_lens), topk)
    indices = torch.where(torch.isfinite(vals), cols, -1).to(torch.int32)
    o, lse = cache_sparse_attention(q, k_cache, v_cache, indices, scale)
    return o, lse, indices


def cache_sparse_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Sparse attention of each sequence's new token q [B, Hq, D] over the rows `indices` [B, n] (int32 cache
    rows of its own sequence, -1 = unused) of k_cache, v_cache [B, L, Hkv, D]: the caches flattened to one row
    space, as sparse_attention_reference takes them. Returns (o [B, Hq, D], lse f32 [B, Hq])."""
    bsz, lmax = k_cache.shape[0], k_cache.shape[1]
    base = (torch.arange(bsz, device=q.device, dtype=torch.int32) * lmax)[:, None]
    flat = torch.where(indices >= 0, indices + base, indices)
    k_flat = k_cache.reshape(bsz * lmax, *k_cache.shape[2:])
    v_flat = v_cache.reshape(bsz * lmax, *v_cache.shape[2:])
    return sparse_attention_reference(q, k_flat, v_flat, flat, scale)


def decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Dense decode step: each sequence's new token (q [B, Hq, D]) over its first cache_lens[b] cache rows
    (k_cache, v_cache [B, L, Hkv, D]). Returns (o [B, Hq, D] in q.dtype, lse float32 [B, Hq])."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    span = int(cache_lens.max())
    keys = _acc(k_cache[:, :span])
    vals = _acc(v_cache[:, :span])
    s = torch.einsum("bhgd,bshd->bhgs", _acc(q).view(bsz, hkv, g, d), keys) * scale
    pos = torch.arange(span, device=q.device)
    s = s.masked_fill((pos[None, :] >= cache_lens[:, None].to(pos.device))[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhgs,bshd->bhgd", torch.exp(s - lse[..., None]), vals)
    return o.reshape(bsz, hq, d).to(q.dtype), lse.reshape(bsz, hq)


def reference_scale(head_dim: int) -> float:
    """Softmax scale of the main attention (1/sqrt(D)); kept here so kernels and model agree."""
    return 1.0 / math.sqrt(head_dim)


__all__ = [
    "decode_attention_reference",
    "decode_index_scores",
    "dense_attention_reference",
    "dsa_decode_reference",
    "indexer_kl_reference",
    "indexer_scores_block",
    "indexer_topk_reference",
    "reference_scale",
    "sample_bounds",
    "sparse_attention_reference",
    "topk_lowest_index_ties",
]
