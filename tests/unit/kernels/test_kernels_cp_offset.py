"""The kernels' query-row offset (context parallelism: a rank holds query rows [r0, r1) of a pack and every key
row): the Triton indexer top-k, sparse attention, indexer KL and the lower-right-causal SDPA on a row range that
starts mid-sample and crosses sample boundaries, against the dsa_reference spec run over the whole pack (random
inputs everywhere, so the rows outside the range are real data the kernels must not read as queries)."""

from __future__ import annotations

import pytest
import torch

from keye.kernels import dsa_reference as ref
from keye.kernels.dense_sdpa import suffix_causal_sdpa
from keye.kernels.indexer_kl import indexer_kl
from keye.kernels.indexer_topk import indexer_topk
from keye.kernels.sparse_attention import sparse_attention

T = 53
CU = torch.tensor([0, 5, 45, T], dtype=torch.int32)  # a sample shorter than topk, odd lengths
RANGES = [(17, 50), (0, 9), (44, 53), (20, 21)]  # mid-sample starts, crossing samples, one row


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("r0", "r1"), RANGES)
@pytest.mark.parametrize("kw", [{}, {"method": "slab", "sample": 32}, {"sample_max": 16}])
def test_indexer_topk_offset(r0: int, r1: int, kw: dict) -> None:
    q, k, w = _rand(T, 2, 16, seed=1), _rand(T, 16, seed=2), _rand(T, 2, seed=3)
    ridx, rsc = ref.indexer_topk_reference(q, k, w, CU, 6)
    idx, sc = indexer_topk(q[r0:r1].clone(), k, w[r0:r1].clone(), CU, 6, q_row0=r0, **kw)
    assert idx.shape == (r1 - r0, 6)
    assert torch.equal(idx, ridx[r0:r1])
    torch.testing.assert_close(sc, rsc[r0:r1], rtol=1e-5, atol=1e-5)


def test_indexer_topk_offset_rejects_rows_past_the_keys() -> None:
    with pytest.raises(ValueError, match="not within"):
        indexer_topk(_rand(9, 2, 16, seed=1), _rand(T, 16, seed=2), _rand(9, 2, seed=3), CU, 6, q_row0=T - 4)


@pytest.mark.parametrize(("r0", "r1"), RANGES[:2])
def test_sparse_attention_fewer_query_rows_than_keys(r0: int, r1: int) -> None:
    q, k, v = _rand(T, 4, 16, seed=4), _rand(T, 2, 16, seed=5), _rand(T, 2, 16, seed=6)
    idx, _ = ref.indexer_topk_reference(
        _rand(T, 2, 16, seed=1), _rand(T, 16, seed=2), _rand(T, 2, seed=3), CU, 6
    )
    qs = q[r0:r1].clone().requires_grad_()
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    o, lse = sparse_attention(qs, kk, vv, idx[r0:r1], 0.25)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ro, rlse = ref.sparse_attention_reference(qr, kr, vr, idx, 0.25)
    torch.testing.assert_close(o, ro[r0:r1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, rlse[r0:r1], rtol=1e-5, atol=1e-5)
    go = _rand(r1 - r0, 4, 16, seed=7)
    o.backward(go)
    ro[r0:r1].backward(go)
    torch.testing.assert_close(qs.grad, qr.grad[r0:r1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kk.grad, kr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vv.grad, vr.grad, rtol=1e-4, atol=1e-5)


def _kl_reference_rows(q, k, q_idx, k_idx, w, indices, r0: int, r1: int) -> torch.Tensor:  # noqa: ANN001
    """Mean over rows [r0, r1) of the reference's per-token KL (its blocks restricted to those rows)."""
    total = q_idx.new_zeros(())
    for a, b in ref.sample_bounds(CU):
        q0, q1 = max(a, r0), min(b, r1)
        if q0 < q1:
            ib = None if indices is None else indices[q0:q1]
            total = total + ref._kl_block(q, k, q_idx, k_idx, w, ib, a, q0, q1, 0.25)
    return total / (r1 - r0)


@pytest.mark.parametrize(("r0", "r1"), RANGES[:3])
@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_offset(r0: int, r1: int, sparse: bool) -> None:
    q, k = _rand(T, 4, 16, seed=4), _rand(T, 2, 16, seed=5)
    qi, ki, w = _rand(T, 2, 16, seed=1), _rand(T, 16, seed=2), _rand(T, 2, seed=3)
    indices = ref.indexer_topk_reference(qi, ki, w, CU, 6)[0] if sparse else None
    qi_r, ki_r, w_r = (x.clone().requires_grad_() for x in (qi, ki, w))
    want = _kl_reference_rows(q, k, qi_r, ki_r, w_r, indices, r0, r1)
    want.backward()
    qi_t, w_t = qi[r0:r1].clone().requires_grad_(), w[r0:r1].clone().requires_grad_()
    ki_t = ki.clone().requires_grad_()
    sub = None if indices is None else indices[r0:r1]
    got = indexer_kl(q[r0:r1], k, CU, 0.25, qi_t, ki_t, w_t, sub, q_row0=r0)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qi_t.grad, qi_r.grad[r0:r1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_t.grad, w_r.grad[r0:r1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ki_t.grad, ki_r.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("n", "length"), [(7, 19), (19, 19), (1, 5)])
def test_suffix_causal_sdpa_is_the_reference_at_an_offset(n: int, length: int) -> None:
    q, k, v = _rand(length, 6, 8, seed=8), _rand(length, 2, 8, seed=9), _rand(length, 2, 8, seed=10)
    qs = q[length - n :].clone().requires_grad_()
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    o = suffix_causal_sdpa(qs, kk, vv, 0.3)
    cu = torch.tensor([0, length], dtype=torch.int32)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ro, _ = ref.dense_attention_reference(qr, kr, vr, cu, 0.3)
    torch.testing.assert_close(o, ro[length - n :], rtol=1e-5, atol=1e-5)
    go = _rand(n, 6, 8, seed=11)
    o.backward(go)
    ro[length - n :].backward(go)
    torch.testing.assert_close(qs.grad, qr.grad[length - n :], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kk.grad, kr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vv.grad, vr.grad, rtol=1e-4, atol=1e-5)
