"""FP8 lightning indexer: the quantisation math (scales fold into the weights / score columns) and the Triton
indexer and decode top-k with per-key scales, on e4m3-rounded values held in fp32 (the interpreter has no FP8)."""

from __future__ import annotations

import torch

from keye.kernels.decode import decode_topk
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
