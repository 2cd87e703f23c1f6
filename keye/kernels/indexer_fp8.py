"""FP8 (e4m3) lightning indexer: per-token scales, as DeepSeek-V3.2 keeps its indexer keys, for prefill top-k and an
FP8 indexer key cache for decode.

Why it is exact up to the quantisation: a scale s > 0 commutes with the relu, so with q = sq * q8 (per token and
indexer head) and k = sk * k8 (per key), I[t, s] = sk[s] * sum_j (w[t, j] sq[t, j]) relu(q8[t, j] . k8[s] / sqrt(D_I)):
the query scales fold into the weights and the key scale multiplies each score column once, so the kernels run
their tensor-core dots on the FP8 values (keye/kernels/indexer_topk.py, decode.py: `k_scale`). The reference is
the bf16/fp32 indexer on the dequantised values (`dequantize`), and `topk_recall` measures what FP8 costs against
the unquantised scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def quantize_rows(x: Tensor, dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """(x8, scale f32) with x ~= x8 * scale[..., None], one scale per last-dim row (amax / 448, never 0).
    dtype=torch.float32 keeps the e4m3-rounded values in fp32 (the Triton interpreter has no FP8)."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    x8 = (x.float() / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return (x8 if dtype == FP8 else x8.to(dtype)), scale


def quantize_indexer_query(q_idx: Tensor, w: Tensor, dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """(q8 [T, H_I, D_I], w * sq f32 [T, H_I]): per (token, head) scales folded into the head weights."""
    q8, sq = quantize_rows(q_idx, dtype)
    return q8, (w.float() * sq).contiguous()


def quantize_indexer_keys(k_idx: Tensor, dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    """(k8 [..., D_I], sk f32 [...]): what an FP8 indexer key cache stores (1 + 4/D_I bytes per dim)."""
    return quantize_rows(k_idx, dtype)


def dequantize(x8: Tensor, scale: Tensor) -> Tensor:
    return x8.float() * scale[..., None]


def indexer_topk_fp8(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    cu_seqlens: Tensor,
    topk: int,
    block: int = 1024,
    **options: object,
) -> tuple[Tensor, Tensor]:
    """Top-k of the FP8 indexer (the Triton `indexer_topk` on e4m3 queries/keys with per-token scales); same
    contract as `indexer_topk_reference` applied to the dequantised values."""
    from keye.kernels.indexer_topk import indexer_topk

    dtype = FP8 if q_idx.is_cuda else torch.float32
    q8, wq = quantize_indexer_query(q_idx, w, dtype)
    k8, sk = quantize_indexer_keys(k_idx, dtype)
    return indexer_topk(q8, k8, wq, cu_seqlens, topk, block, k_scale=sk, **options)


def fake_quantize(x: Tensor) -> Tensor:
    """x quantised per row to e4m3 and dequantised, in float32: what the FP8 kernels see, as the reference sees it."""
    return dequantize(*quantize_rows(x))


def indexer_topk_fp8_reference(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, cu_seqlens: Tensor, topk: int, block: int = 1024
) -> tuple[Tensor, Tensor]:
    """The FP8 indexer's top-k by definition: `indexer_topk_reference` on the dequantised query and keys (float32)
    with the unquantised weights (the Triton path folds the query scales into them; equal up to rounding)."""
    from keye.kernels.dsa_reference import indexer_topk_reference

    return indexer_topk_reference(
        fake_quantize(q_idx), fake_quantize(k_idx), w.float(), cu_seqlens, topk, block
    )


def dsa_decode_fp8_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_idx: Tensor,
    k8_cache: Tensor,
    k_scale: Tensor,
    w: Tensor,
    cache_lens: Tensor,
    topk: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DSA decode step over an FP8 indexer key cache (k8_cache [B, L, D_I] e4m3, k_scale f32 [B, L]): the new
    token's indexer query quantised per head, both dequantised, then `dsa_decode_reference`."""
    from keye.kernels.dsa_reference import dsa_decode_reference

    k_deq = dequantize(k8_cache, k_scale)
    return dsa_decode_reference(
        q, k_cache, v_cache, fake_quantize(q_idx), k_deq, w.float(), cache_lens, topk, scale
    )


def dsa_decode_fp8(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_idx: Tensor,
    k8_cache: Tensor,
    k_scale: Tensor,
    w: Tensor,
    cache_lens: Tensor,
    topk: int,
    scale: float,
    **options: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton `dsa_decode` on the FP8 cache: the query made e4m3 inside the kernels with its scales folded into the
    weights (`decode_topk(quantize_query=True)`), per-row key scales (`k_scale=`). Off CUDA the cache's e4m3 values
    travel as float32 (the interpreter's dot has no FP8)."""
    from keye.kernels.decode import dsa_decode

    dtype = FP8 if q_idx.is_cuda else torch.float32
    k8 = k8_cache if k8_cache.dtype == dtype else k8_cache.to(dtype)
    return dsa_decode(
        q,
        k_cache,
        v_cache,
        q_idx,
        k8,
        w,
        cache_lens,
        topk,
        scale,
        k_scale=k_scale,
        quantize_query=True,
        **options,
    )


def write_fp8_rows_reference(rows: Tensor, cache8: Tensor, scales: Tensor, lengths: Tensor) -> None:
    """A decode step's new indexer keys rows [B, D_I] into an FP8 key cache at each sequence's length:
    cache8[b, lengths[b]] = e4m3 row (in cache8's dtype), scales[b, lengths[b]] = its scale."""
    k8, sk = quantize_indexer_keys(rows, cache8.dtype)
    b = torch.arange(rows.shape[0], device=lengths.device)
    cache8[b, lengths] = k8
    scales[b, lengths] = sk


def topk_recall(got: Tensor, want: Tensor) -> float:
    """Mean over rows of |got & want| / |want| (index sets, -1 ignored; rows with empty want skipped)."""
    big = torch.iinfo(torch.int64).max
    g = torch.where(got >= 0, got.long(), big).sort(dim=1).values
    wv = torch.where(want >= 0, want.long(), big)
    at = torch.searchsorted(g, wv).clamp(max=g.shape[1] - 1)
    hit = ((g.gather(1, at) == wv) & (wv != big)).sum(1).double()
    n = (want >= 0).sum(1).double()
    keep = n > 0
    return float((hit[keep] / n[keep]).mean()) if bool(keep.any()) else float("nan")


__all__ = [
    "dequantize",
    "dsa_decode_fp8",
    "dsa_decode_fp8_reference",
    "fake_quantize",
    "indexer_topk_fp8_reference",
    "indexer_topk_fp8",
    "quantize_indexer_keys",
    "quantize_indexer_query",
    "write_fp8_rows_reference",
    "quantize_rows",
    "topk_recall",
]
