"""Triton indexer kernels (top-k selection, KL loss) against the dsa_reference spec; CPU runs use TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from keye.kernels.dsa_reference import indexer_kl_reference, indexer_topk_reference
from keye.kernels.indexer_kl import indexer_kl
from keye.kernels.indexer_topk import indexer_topk, row_starts


def _inputs(kind: str, t: int, h: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return (
            torch.randn(t, h, d, generator=g),
            torch.randn(t, d, generator=g),
            torch.randn(t, h, generator=g),
        )
    # small integers: many exact ties (the tie rule is part of the contract), still no all-zero tensor
    q = torch.randint(-1, 2, (t, h, d), generator=g).float()
    k = torch.randint(-1, 2, (t, d), generator=g).float()
    w = torch.randint(1, 3, (t, h), generator=g).float()
    return q, k, w


def test_row_starts_packed() -> None:
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert row_starts(cu, 8).tolist() == [0, 0, 0, 3, 3, 3, 3, 7]


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("random", {}),  # fused path: rows longer than cap=32 go through a sampled threshold
        ("random", {"sample_max": 16}),  # strided score samples
        ("random", {"sample_stride": 3}),
        ("ties", {"sample_max": 16}),  # thresholds on heavy ties miss: those rows are redone on the slab path
        ("random", {"scratch_bytes": 1, "fused_tile": (16, 32, 4)}),  # several row chunks
        ("random", {"method": "slab", "sample": 32}),  # slab path, sampled-threshold selection
        ("ties", {"method": "slab", "sample": 32}),
        ("ties", {"force_radix": True}),  # exact radix-select path
        ("random", {"method": "slab", "cap": 16, "sample": 16, "slab_bytes": 1600}),  # several query chunks
        ("ties", {"method": "slab", "cap": 16, "sample": 4}),  # coarse sample: the radix fallback decides
        ("random", {"method": "slab", "cap": 16, "sample": 4}),
    ],
)
def test_indexer_topk_matches_reference(kind: str, kw: dict) -> None:
    t, topk = 53, 6
    cu = torch.tensor([0, 5, 45, t], dtype=torch.int32)  # a sample shorter than topk, odd lengths
    q, k, w = _inputs(kind, t, 2, 16, seed=len(kind) + len(kw))
    idx, sc = indexer_topk(q, k, w, cu, topk, **kw)
    ridx, rsc = indexer_topk_reference(q, k, w, cu, topk)
    assert idx.dtype == torch.int32 and sc.dtype == torch.float32
    assert torch.equal(idx, ridx)
    assert torch.equal(torch.isinf(sc), torch.isinf(rsc))
    torch.testing.assert_close(sc, rsc, rtol=1e-5, atol=1e-5)
    assert (idx[:5, 5] == -1).all() and (idx[10:45] >= 0).all()  # short rows padded, full rows full


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_loss_and_grads(sparse: bool) -> None:
    g = torch.Generator().manual_seed(3)
    t, hq, hkv, d, hi, di = 21, 4, 2, 16, 2, 16
    cu = torch.tensor([0, 8, t], dtype=torch.int32)
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g)
    qi, ki, w = (
        torch.randn(t, hi, di, generator=g),
        torch.randn(t, di, generator=g),
        torch.randn(t, hi, generator=g),
    )
    indices = indexer_topk_reference(qi, ki, w, cu, 5)[0] if sparse else None
    ours = [x.clone().requires_grad_() for x in (qi, ki, w)]
    ref = [x.clone().requires_grad_() for x in (qi, ki, w)]
    loss = indexer_kl(q, k, cu, 0.25, *ours, indices)
    want = indexer_kl_reference(q, k, cu, 0.25, *ref, indices)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert float(loss.detach()) > 0
    for a, b in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(want, ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
