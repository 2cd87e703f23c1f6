"""Triton sparse GQA attention (forward, both backward paths) and the DSA decode step against dsa_reference."""

from __future__ import annotations

import torch

from keye.kernels.decode import dsa_decode
from keye.kernels.dsa_reference import (
    dsa_decode_reference,
    indexer_topk_reference,
    sparse_attention_reference,
)
from keye.kernels.sparse_attention import sparse_attention, sparse_attention_bwd, sparse_attention_fwd


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, hq, hkv, d, topk = 13, 4, 2, 16, 5
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    idx = torch.full((t, topk), -1, dtype=torch.int32)
    for i in range(t):
        n = min(topk, i + 1)
        idx[i, :n] = torch.randperm(i + 1, generator=g)[:n].int()
    idx[7, 1] = -1  # a hole in the middle of a selection
    idx[3] = -1  # a token with nothing selected: o = 0, lse = -inf
    return q, k, v, idx


def test_sparse_forward_matches_reference() -> None:
    q, k, v, idx = _case()
    o, lse = sparse_attention_fwd(q, k, v, idx, 0.3)
    ro, rl = sparse_attention_reference(q, k, v, idx, 0.3)
    torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, rl, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[3]).all() and (o[3] == 0).all()


def test_sparse_backward_both_paths_match_reference() -> None:
    q, k, v, idx = _case(1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ro, _ = sparse_attention_reference(*leaves, idx, 0.3)
    do = torch.randn(ro.shape, generator=torch.Generator().manual_seed(2))
    want = torch.autograd.grad(ro, leaves, do)
    for det in (False, True):
        mine = [x.clone().requires_grad_() for x in (q, k, v)]
        o, _ = sparse_attention(*mine, idx, 0.3, det)
        got = torch.autograd.grad(o, mine, do)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    o, lse = sparse_attention_fwd(q, k, v, idx, 0.3)
    first = sparse_attention_bwd(q, k, v, idx, o, lse, do, 0.3, deterministic=True)
    again = sparse_attention_bwd(q, k, v, idx, o, lse, do, 0.3, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_decode_matches_prefill_reference() -> None:
    g = torch.Generator().manual_seed(4)
    b, lmax, hq, hkv, d, hi, di, topk = 3, 40, 4, 2, 16, 2, 16, 6
    lens = torch.tensor([40, 7, 23], dtype=torch.int32)
    q = torch.randn(b, hq, d, generator=g)
    kc, vc = torch.randn(b, lmax, hkv, d, generator=g), torch.randn(b, lmax, hkv, d, generator=g)
    qi, w = torch.randn(b, hi, di, generator=g), torch.randn(b, hi, generator=g)
    kic = torch.randint(-1, 2, (b, lmax, di), generator=g).float()  # ties in the index scores
    want = dsa_decode_reference(q, kc, vc, qi, kic, w, lens, topk, 0.3)
    # candidates from several segments / from one; 16 candidate slots (2x next_pow2(k)) with a larger sample and
    # the threshold from its own kernel
    # attention in one program per KV head (chunk >= k) or split in chunks of 4 rows and merged
    for kw in (
        dict(seg_len=16),
        dict(seg_len=64, chunk=4),
        dict(seg_len=16, cap=16, sample=32, tau_warps=4),
    ):
        o, lse, idx = dsa_decode(q, kc, vc, qi, kic, w, lens, topk, 0.3, **kw)
        assert torch.equal(idx, want[2])
        torch.testing.assert_close(o, want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)
        for i in range(b):
            n = int(lens[i])
            qq = torch.zeros(n, hi, di)
            qq[-1] = qi[i]
            ww = torch.zeros(n, hi)
            ww[-1] = w[i]
            ridx, _ = indexer_topk_reference(
                qq, kic[i, :n], ww, torch.tensor([0, n], dtype=torch.int32), topk
            )
            assert torch.equal(idx[i], ridx[-1])
            ro, rl = sparse_attention_reference(q[i : i + 1], kc[i, :n], vc[i, :n], ridx[-1:], 0.3)
            torch.testing.assert_close(o[i : i + 1], ro, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[i : i + 1], rl, rtol=1e-5, atol=1e-5)


def test_decode_threshold_miss_falls_back_to_exact_select() -> None:
    """All index scores equal: every row passes the threshold (more than CAP = 16 candidate slots), so the select
    kernel's second program runs the exact radix select over the stored scores; ties go to the smaller
    rows."""
    g = torch.Generator().manual_seed(5)
    b, lmax, hq, hkv, d, hi, di, topk = 2, 50, 4, 2, 16, 2, 16, 6
    lens = torch.tensor([50, 41], dtype=torch.int32)
    q = torch.randn(b, hq, d, generator=g)
    kc, vc = torch.randn(b, lmax, hkv, d, generator=g), torch.randn(b, lmax, hkv, d, generator=g)
    qi, w = torch.rand(b, hi, di, generator=g) + 0.5, torch.rand(b, hi, generator=g) + 0.5
    kic = torch.full((b, lmax, di), 0.25)
    want = dsa_decode_reference(q, kc, vc, qi, kic, w, lens, topk, 0.3)
    o, lse, idx = dsa_decode(q, kc, vc, qi, kic, w, lens, topk, 0.3, seg_len=16)
    assert idx.tolist() == [list(range(6))] * 2 and torch.equal(idx, want[2])
    torch.testing.assert_close(o, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)
