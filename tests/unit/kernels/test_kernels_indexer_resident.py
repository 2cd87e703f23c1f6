"""Resident-query indexer (keye/kernels/indexer_resident.py): its scores against the reference scores, both MMA
orientations and the head sum as a second dot, per-key FP8 scales, and the library's fused top-k with it as the score
+ compact kernel (packed samples of odd lengths; interpreter, float32)."""

from __future__ import annotations

import pytest
import torch

from keye.kernels.dsa_reference import indexer_scores_block, indexer_topk_reference
from keye.kernels.indexer_fp8 import dequantize, quantize_indexer_keys, quantize_indexer_query, quantize_rows
from keye.kernels.indexer_resident import resident_scores
from keye.kernels.indexer_topk import indexer_topk


def _inputs(seed: int, t: int, h: int, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, d, generator=g), torch.randn(t, d, generator=g), torch.randn(t, h, generator=g)


def _reference_scores(q, k, w, cu) -> torch.Tensor:
    t = q.shape[0]
    out = torch.full((t, t), float("-inf"))
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            out[a:b, a:b] = indexer_scores_block(q, k, w, a, a, b)
    return out


@pytest.mark.parametrize(
    ("h", "tile"),
    [
        (4, (4, 16, 4, 2, False)),  # queries on the MMA's M, head sum over row groups
        (3, (4, 32, 4, 2, True)),  # keys on M (DeepGEMM's layout), 3 heads padded to 4
        (4, (8, 16, 4, 2, True, True)),  # head sum as a second dot (fp32 operands in the interpreter)
        (3, (8, 16, 4, 2, True, False, True)),  # heads in one thread's registers (permuted columns)
        (4, (4, 32, 4, 2, True, False, True, True, True)),  # + transposed epilogue, next dot issued early
    ],
)
def test_resident_scores_match_reference(h: int, tile: tuple) -> None:
    t = 77
    cu = torch.tensor([0, 30, 31, t], dtype=torch.int32)  # odd lengths, a one-token sample
    q, k, w = _inputs(h + len(tile), t, h)
    got = resident_scores(q, k, w, cu, tile=tile)
    want = _reference_scores(q, k, w, cu)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_resident_scores_fp8_key_scales() -> None:
    t, h = 45, 4
    cu = torch.tensor([0, 19, t], dtype=torch.int32)
    q, k, w = _inputs(7, t, h)
    q8, wq = quantize_indexer_query(q, w, torch.float32)
    k8, sk = quantize_indexer_keys(k, torch.float32)
    _, sq = quantize_rows(q)
    got = resident_scores(q8, k8, wq, cu, k_scale=sk, tile=(4, 16, 4, 2, True))
    want = _reference_scores(dequantize(q8, sq), dequantize(k8, sk), w, cu)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "tile", [(4, 16, 4, 2, True), (4, 32, 4, 2, False), (8, 16, 4, 2, True, False, True, True, True)]
)
def test_fused_topk_with_resident_scores(tile: tuple) -> None:
    t, h, topk = 97, 3, 6
    cu = torch.tensor([0, 5, 58, t], dtype=torch.int32)  # a sample shorter than topk
    q, k, w = _inputs(3, t, h)
    want, want_s = indexer_topk_reference(q, k, w, cu, topk)
    got, got_s = indexer_topk(q, k, w, cu, topk, cap=32, sample_max=16, resident_tile=tile)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)
    r0 = 40  # context parallelism: only rows [40, 97) held
    part, _ = indexer_topk(q[r0:], k, w[r0:], cu, topk, cap=32, sample_max=16, resident_tile=tile, q_row0=r0)
    assert torch.equal(part, want[r0:])
