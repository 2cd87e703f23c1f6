"""Block selections (block-shared top-k, union of token selections), the selection generator/statistics, and the
Triton block-sparse attention against its reference (TRITON_INTERPRET=1 on CPU, float32, odd packed sizes)."""

from __future__ import annotations

import pytest
import torch

from keye.kernels.block_selection import (
    block_layout,
    block_sparse_attention_reference,
    block_topk,
    expand_block_indices,
    union_of_selections,
    union_token_indices,
)
from keye.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_fwd
from keye.kernels.block_topk import block_topk_triton
from keye.kernels.dsa_reference import (
    indexer_scores_block,
    sparse_attention_reference,
    topk_lowest_index_ties,
)
from keye.kernels.selections import adjacent_jaccard, selection_stats, synthetic_selections

CU = torch.tensor([0, 37, 38, 101], dtype=torch.int32)  # packed: odd lengths, a one-token sample


def _qkv(seed: int, t: int = 101, hq: int = 4, hkv: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))


def _as_sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(r[r >= 0].tolist()) for r in idx]


def test_block_layout_never_straddles_samples() -> None:
    assert block_layout(CU, 16).tolist() == [0, 16, 32, 37, 38, 54, 70, 86, 101]


def test_synthetic_selections_are_causal_and_hit_their_overlap() -> None:
    cu = torch.tensor([0, 700, 1999], dtype=torch.int32)
    topk = 64
    a = torch.cat([torch.full((700,), 0), torch.full((1299,), 700)])
    got = {}
    for overlap in (0.0, 0.5, 0.8, 0.95):
        idx = synthetic_selections(
            cu, topk, overlap, local_share=0.125 if overlap else 0.0, sink=4 * (overlap > 0)
        )
        valid = idx >= 0
        rows = torch.arange(1999)[:, None]
        assert bool(((idx <= rows) & (idx >= a[:, None]) | ~valid).all())
        sizes = valid.sum(1)
        want_n = (torch.arange(1999) - a + 1).clamp(max=topk)
        assert bool((sizes <= want_n).all()) and float(sizes.sum() / want_n.sum()) > 0.9  # duplicates dropped
        sparse = torch.arange(1999) - a >= topk  # tokens that select (not take everything)
        sub = idx[sparse]
        got[overlap] = adjacent_jaccard(sub, torch.tensor([0, sub.shape[0]]), max_pairs=100000)
    assert got[0.0] < 0.1
    for want in (0.5, 0.8, 0.95):
        assert abs(got[want] - want) < 0.06, got
    stats = selection_stats(
        synthetic_selections(cu, topk, 0.8, local_share=0.25, sink=4), cu, window=16, sink=4
    )
    assert 0.25 <= stats["local_share"] < 0.45 and stats["sink_share"] > 0.05


def test_block_topk_matches_pooled_scores() -> None:
    g = torch.Generator().manual_seed(3)
    t, hi, di, topk, block = 101, 3, 16, 9, 8
    q_idx = torch.randn(t, hi, di, generator=g)
    k_idx = torch.randn(t, di, generator=g)
    w = torch.randn(t, hi, generator=g)
    bidx, bstart = block_topk(q_idx, k_idx, w, CU, topk, block, chunk=3)
    assert bstart.tolist() == block_layout(CU, block).tolist()
    cu = CU.tolist()
    assert bidx.shape == (bstart.numel() - 1, topk + block)
    for b in range(bidx.shape[0]):
        t0, t1 = int(bstart[b]), int(bstart[b + 1])
        a = max(x for x in cu if x <= t0)
        qb, wb = q_idx[t0:t1].mean(0, keepdim=True), w[t0:t1].mean(0, keepdim=True)
        want: list[int] = []
        if t0 > a:  # earlier keys of the sample, scored by the pooled query
            scores = (wb[:, :, None] * torch.relu(qb @ k_idx[a:t0].T * di**-0.5)).sum(1)[0]
            _, cols = topk_lowest_index_ties(
                scores[None], min(topk, t0 - a)
            )  # relu zeros tie: smaller row wins
            want = sorted((cols[0] + a).tolist())
        sel, own = bidx[b, :topk], bidx[b, topk:]
        assert sel[sel >= 0].tolist() == want and bool((sel[len(want) :] == -1).all())
        assert own[own >= 0].tolist() == list(range(t0, t1))  # the block's own rows, attended causally
    assert indexer_scores_block is not None  # the per-token scores stay the spec of the token mode


def test_block_topk_kernel_matches_reference() -> None:
    g = torch.Generator().manual_seed(11)
    t, hi, di, topk, block = 101, 2, 16, 13, 8
    q_idx, k_idx, w = (
        torch.randn(t, hi, di, generator=g),
        torch.randn(t, di, generator=g),
        torch.randn(t, hi, generator=g),
    )
    want, bstart = block_topk(q_idx, k_idx, w, CU, topk, block)
    got, bstart2 = block_topk_triton(q_idx, k_idx, w, CU, topk, block, slab_bytes=4 * 40 * 64, tile=(16, 32, 4),
                                     select_block=32, sample=16)  # fmt: skip
    assert torch.equal(bstart, bstart2) and torch.equal(got, want)


def test_union_round_trips_token_selections() -> None:
    idx = synthetic_selections(CU, 12, 0.8, local_share=0.25, sink=1, seed=5)
    idx[50, 3] = -1  # a hole
    bstart = block_layout(CU, 8)
    uidx, bits = union_of_selections(idx, bstart)
    assert _as_sets(union_token_indices(uidx, bits, bstart)) == _as_sets(idx)
    for b in range(uidx.shape[0]):
        row = uidx[b][uidx[b] >= 0].tolist()
        assert row == sorted(set(row))


@pytest.mark.parametrize("mode", ["shared", "union"])
def test_block_sparse_kernel_matches_reference(mode: str) -> None:
    q, k, v = _qkv(7)
    bstart = block_layout(CU, 8)
    if mode == "shared":
        g = torch.Generator().manual_seed(8)
        bidx, _ = block_topk(torch.randn(101, 2, 16, generator=g), torch.randn(101, 16, generator=g),
                             torch.randn(101, 2, generator=g), CU, 11, 8)  # fmt: skip
        bits = None
        tok_idx = expand_block_indices(bidx, bstart, 101)
    else:
        tok_idx = synthetic_selections(CU, 10, 0.5, local_share=0.2, seed=9)
        bidx, bits = union_of_selections(tok_idx, bstart)
    ro, rl = block_sparse_attention_reference(q, k, v, bidx, bstart, 0.3, bits)
    so, sl = sparse_attention_reference(q, k, v, tok_idx, 0.3)
    torch.testing.assert_close(ro, so)
    for bq, bk in ((8, 16), (16, 32)):
        o, lse = block_sparse_attention_fwd(q, k, v, bidx, bstart, 0.3, bits, block_q=bq, block_k=bk)
        torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, rl, rtol=1e-5, atol=1e-5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, _ = block_sparse_attention_reference(*leaves, bidx, bstart, 0.3, bits)
    do = torch.randn(ro.shape, generator=torch.Generator().manual_seed(10))
    want = torch.autograd.grad(ro, leaves, do)
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = block_sparse_attention(*mine, bidx, bstart, 0.3, bits)
    got = torch.autograd.grad(o, mine, do)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
