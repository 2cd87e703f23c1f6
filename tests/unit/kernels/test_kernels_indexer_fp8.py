"""FP8 lightning indexer: the quantisation math (scales fold into the weights / score columns) and the Triton
indexer and decode top-k with per-key scales, on e4m3-rounded values held in fp32 (the interpreter has no FP8 dot,
and its fp8 cast drops carries: the decode kernels round to e4m3 arithmetically, tested here against torch's cast)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keye.kernels.decode import _round_e4m3, decode_topk
from keye.kernels.dsa_reference import dsa_decode_reference, indexer_topk_reference
from keye.kernels.indexer_fp8 import (
    dequantize,
    quantize_indexer_keys,
    quantize_indexer_query,
    quantize_rows,
    topk_recall,
)
from keye.kernels.indexer_topk import indexer_topk


def _inputs(seed: int, t: int = 131, hi: int = 3, di: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(t, hi, di, generator=g) * 3,
        torch.randn(t, di, generator=g),
        torch.randn(t, hi, generator=g),
    )


def test_quantisation_error_and_folded_scales() -> None:
    q, k, w = _inputs(0)
    k8, sk = quantize_rows(k)
    assert k8.dtype == torch.float8_e4m3fn and bool((sk > 0).all())
    err = (dequantize(k8, sk) - k).abs() / k.abs().amax(-1, keepdim=True)
    assert float(err.max()) <= 2**-4  # e4m3: 3 mantissa bits
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    k8f, sk = quantize_indexer_keys(k, torch.float32)
    scale = 16**-0.5
    folded = sk[None, :] * (wq[:, :, None] * torch.relu(torch.einsum("tjd,sd->tjs", q8, k8f) * scale)).sum(1)
    _, sq = quantize_rows(q)
    deq = (
        w[:, :, None]
        * torch.relu(torch.einsum("tjd,sd->tjs", dequantize(q8, sq), dequantize(k8f, sk)) * scale)
    ).sum(1)
    torch.testing.assert_close(folded, deq, rtol=1e-5, atol=1e-5)


def test_fp8_indexer_kernel_matches_dequantised_reference() -> None:
    q, k, w = _inputs(1)
    cu = torch.tensor([0, 57, 58, 131], dtype=torch.int32)
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    k8, sk = quantize_indexer_keys(k, torch.float32)
    _, sq = quantize_rows(q)
    want, want_s = indexer_topk_reference(dequantize(q8, sq), dequantize(k8, sk), w, cu, 9)
    got, got_s = indexer_topk(q8, k8, wq, cu, 9, k_scale=sk, cap=32, sample_max=16)  # fused path
    assert torch.equal(got, want)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)
    bf, _ = indexer_topk_reference(q, k, w, cu, 9)
    assert 0.7 < topk_recall(got, bf) <= 1.0


def test_fp8_decode_key_cache_matches_dequantised_reference() -> None:
    g = torch.Generator().manual_seed(2)
    b, lmax, hi, di, topk = 2, 300, 3, 16, 7
    lens = torch.tensor([300, 41], dtype=torch.int32)
    q = torch.randn(b, hi, di, generator=g)
    kc = torch.randn(b, lmax, di, generator=g)
    w = torch.randn(b, hi, generator=g)
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    k8, sk = quantize_indexer_keys(kc, torch.float32)
    _, sq = quantize_rows(q)
    got, _ = decode_topk(q8, k8, wq, lens, topk, seg_len=64, sample=64, k_scale=sk)
    hq, hkv, d = 2, 1, 16
    qq, kk, vv = (
        torch.randn(b, hq, d, generator=g),
        torch.randn(b, lmax, hkv, d, generator=g),
        torch.randn(b, lmax, hkv, d, generator=g),
    )
    _, _, want = dsa_decode_reference(qq, kk, vv, dequantize(q8, sq), dequantize(k8, sk), w, lens, topk, 0.25)
    assert torch.equal(got, want)


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, _round_e4m3(tl.load(X + i)))


def test_in_kernel_e4m3_rounding_equals_torch_cast_at_binade_edges_ties_and_subnormals() -> None:
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid.abs() <= 448)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # ties: to even
    g = torch.Generator().manual_seed(3)
    xs = torch.cat(
        [grid, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), torch.tensor([7.86, 127.87, -31.9, 1e-4, -3e-3]),
         torch.randn(2048, generator=g) * 60, torch.randn(1024, generator=g) * 0.01]
    ).clamp(-448, 448)  # fmt: skip
    n = triton.next_power_of_2(xs.numel())
    x = torch.zeros(n)
    x[: xs.numel()] = xs
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, N=n)
    assert torch.equal(y, x.to(torch.float8_e4m3fn).float())


def test_fp8_decode_quantises_the_query_in_the_kernel_as_torch_does() -> None:
    g = torch.Generator().manual_seed(4)
    b, lmax, hi, di, topk = 3, 260, 5, 16, 9
    lens = torch.tensor([260, 77, 130], dtype=torch.int32)
    q = torch.randn(b, hi, di, generator=g) * torch.tensor([1e-3, 1.0, 30.0])[:, None, None]
    w = torch.randn(b, hi, generator=g)
    k8, sk = quantize_indexer_keys(torch.randn(b, lmax, di, generator=g), torch.float32)
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    want, want_s = decode_topk(q8, k8, wq, lens, topk, seg_len=64, sample=64, k_scale=sk)
    got, got_s = decode_topk(q, k8, w, lens, topk, seg_len=64, sample=64, k_scale=sk, quantize_query=True)
    assert torch.equal(got, want) and torch.equal(got_s, want_s)


def test_fused_fp8_row_write_equals_the_reference_write() -> None:
    from keye.kernels.decode import write_fp8_rows
    from keye.kernels.indexer_fp8 import write_fp8_rows_reference

    g = torch.Generator().manual_seed(5)
    b, lmax, di = 3, 11, 16
    rows = torch.randn(b, di, generator=g) * torch.tensor([1e-4, 1.0, 50.0])[:, None]
    lengths = torch.tensor([0, 7, 10])
    got_c, got_s = (
        torch.full((b, lmax, di), 9.0),
        torch.full((b, lmax), 9.0),
    )  # float32 stand-in of the e4m3 cache
    want_c, want_s = got_c.clone(), got_s.clone()
    write_fp8_rows(rows, got_c, got_s, lengths)
    write_fp8_rows_reference(rows, want_c, want_s, lengths)
    assert torch.equal(got_c, want_c) and torch.equal(got_s, want_s)
    assert int((got_c != 9.0).any(-1).sum()) == b  # one row per sequence written, nothing else
