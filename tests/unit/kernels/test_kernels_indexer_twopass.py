"""Two-pass indexer top-k (keye/kernels/indexer_twopass.py: a score slab, then a per-row selection) against the
reference under the interpreter in float32: identical rows with a float32 slab and the reference's tie rule; the
fast setting (16-bit slab, torch.topk's ties) within a stated recall; FP8 key scales; small slab chunks."""

from __future__ import annotations

import pytest
import torch

from keye.kernels.dsa_reference import indexer_topk_reference
from keye.kernels.indexer_fp8 import (
    dequantize,
    quantize_indexer_keys,
    quantize_indexer_query,
    quantize_rows,
    topk_recall,
)
from keye.kernels.indexer_twopass import indexer_topk_twopass


def _inputs(seed: int, t: int = 150, hi: int = 3, di: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(t, hi, di, generator=g) * 2,
        torch.randn(t, di, generator=g),
        torch.randn(t, hi, generator=g),
    )


@pytest.mark.parametrize("slab_bytes", [1 << 30, 3000])  # one chunk, or many small ones
def test_float32_slab_with_the_reference_tie_rule_is_exact(slab_bytes: int) -> None:
    q, k, w = _inputs(0)
    cu = torch.tensor([0, 61, 62, 150], dtype=torch.int32)
    want, want_s = indexer_topk_reference(q, k, w, cu, 11)
    got, got_s = indexer_topk_twopass(
        q, k, w, cu, 11, slab_dtype=torch.float32, ties="lowest", slab_bytes=slab_bytes, tile=(16, 32, 4)
    )
    assert torch.equal(got, want)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)


def test_fast_setting_recall_and_fp8_scales() -> None:
    q, k, w = _inputs(1)
    cu = torch.tensor([0, 150], dtype=torch.int32)
    want, want_s = indexer_topk_reference(q, k, w, cu, 11)
    got, got_s = indexer_topk_twopass(q, k, w, cu, 11, tile=(16, 32, 4))  # float16 slab, torch.topk ties
    # a valid top-k up to fp16 rounding: every pick scores at least the true k-th score (rel. 2^-10); the sets
    # differ only by the choice among (near-)ties, e.g. relu zeros with 3 heads
    kth = torch.where(torch.isfinite(want_s), want_s, torch.inf).amin(1, keepdim=True)
    picked = torch.where(got >= 0, got_s, torch.inf)
    assert bool((picked >= kth - 2**-10 * kth.abs().clamp(min=1)).all())
    assert topk_recall(got, want) >= 0.95
    rows = (got >= 0).sum(1)
    assert torch.equal(rows, (want >= 0).sum(1))
    srt = torch.where(got >= 0, got, 1 << 30)
    assert bool((srt[:, 1:] >= srt[:, :-1]).all())  # ascending index order, -1 padding last
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    k8, sk = quantize_indexer_keys(k, torch.float32)
    _, sq = quantize_rows(q)
    want8, _ = indexer_topk_reference(dequantize(q8, sq), dequantize(k8, sk), w, cu, 11)
    got8, _ = indexer_topk_twopass(
        q8, k8, wq, cu, 11, slab_dtype=torch.float32, ties="lowest", k_scale=sk, tile=(16, 32, 4)
    )
    assert torch.equal(got8, want8)
