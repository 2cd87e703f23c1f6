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


@pytest.mark.parametrize("chunk", [64, 256])
def test_triton_slab_select_equals_the_lowest_index_tie_rule(chunk: int) -> None:
    """The radix select on a float16 slab with many exact ties (values on a coarse grid), windows shorter and
    longer than k, windows that cross chunk boundaries and an empty one."""
    from keye.kernels.dsa_reference import topk_lowest_index_ties
    from keye.kernels.indexer_twopass import select_slab_triton

    g = torch.Generator().manual_seed(3)
    rows, cols, k = 23, 517, 37
    slab = (torch.randn(rows, cols, generator=g) * 3).round().div(4).to(torch.float16)  # ~30 distinct values
    slab[5] = torch.randn(cols, generator=g).to(torch.float16)  # a row without ties
    slab[6] = -slab[6].abs() - 1  # negative scores only
    lo = torch.randint(0, cols // 2, (rows,), generator=g, dtype=torch.int32)
    hi = (lo + torch.randint(0, cols // 2, (rows,), generator=g, dtype=torch.int32)).clamp(max=cols - 1)
    lo[0], hi[0] = 10, 9  # empty window
    lo[1], hi[1] = 3, 3 + k - 1  # exactly k keys
    lo[2], hi[2] = 0, cols - 1
    col0 = 1000
    out_i = torch.full((rows, k), 7, dtype=torch.int32)
    out_s = torch.zeros(rows, k)
    select_slab_triton(slab, lo, hi, col0, out_i, out_s, k, chunk=chunk)
    inwin = (torch.arange(cols)[None, :] >= lo[:, None]) & (torch.arange(cols)[None, :] <= hi[:, None])
    masked = torch.where(inwin, slab.float(), float("-inf"))
    want_s, want_c = topk_lowest_index_ties(masked, k)
    # a window shorter than k: the reference lists its -inf columns first; the kernel pads after the keys
    key, perm = torch.where(torch.isfinite(want_s), want_c, 1 << 30).sort(dim=1)
    want_i = torch.where(key < (1 << 30), key + col0, -1).to(torch.int32)
    assert torch.equal(out_i, want_i)
    assert torch.equal(out_s, want_s.gather(1, perm))
    slab[7, :50] = -0.0  # -0.0 and +0.0 are one score
    slab[7, 50:100] = 0.0
    slab[7, 100:] = -1.0
    lo[7], hi[7] = 0, cols - 1
    select_slab_triton(slab, lo, hi, col0, out_i, out_s, k, chunk=chunk)
    assert out_i[7].tolist() == list(range(col0, col0 + k))


def test_triton_selector_through_the_two_pass_path() -> None:
    q, k, w = _inputs(4, t=300)
    cu = torch.tensor([0, 97, 98, 300], dtype=torch.int32)
    want, _ = indexer_topk_twopass(q, k, w, cu, 23, ties="lowest", slab_bytes=20000, tile=(16, 32, 4))
    got, _ = indexer_topk_twopass(
        q, k, w, cu, 23, selector="triton", slab_bytes=20000, tile=(16, 32, 4), select_chunk=64
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("tile", [(8, 16, 4, 2, True, False, True), (4, 16, 4, 2, True)])
def test_resident_score_pass_writes_the_same_slab_windows(tile: tuple) -> None:
    """Pass 1 with the resident-query kernel (one dot per key tile for all heads) gives the library pass's picks
    (float32 slab, chunks whose windows start past column 0), through either selector; FP8 key scales too."""
    q, k, w = _inputs(5, t=200)
    cu = torch.tensor([0, 71, 200], dtype=torch.int32)
    want, _ = indexer_topk_twopass(q, k, w, cu, 19, slab_dtype=torch.float32, ties="lowest", slab_bytes=9000)
    got, _ = indexer_topk_twopass(
        q, k, w, cu, 19, slab_dtype=torch.float32, ties="lowest", slab_bytes=9000, tile=tile
    )
    assert torch.equal(got, want)
    got16, _ = indexer_topk_twopass(
        q, k, w, cu, 19, slab_bytes=9000, tile=tile, selector="triton", select_chunk=64
    )
    want16, _ = indexer_topk_twopass(q, k, w, cu, 19, slab_bytes=9000, ties="lowest")
    assert topk_recall(got16, want16) >= 0.99  # float16 rounding of differently summed fp32 scores
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    k8, sk = quantize_indexer_keys(k, torch.float32)
    a, _ = indexer_topk_twopass(
        q8, k8, wq, cu, 19, slab_dtype=torch.float32, ties="lowest", k_scale=sk, tile=tile
    )
    b, _ = indexer_topk_twopass(q8, k8, wq, cu, 19, slab_dtype=torch.float32, ties="lowest", k_scale=sk)
    assert torch.equal(a, b)
