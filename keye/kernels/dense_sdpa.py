"""Dense causal GQA attention over packed samples through torch's scaled_dot_product_attention.

The fast path of `dense_attention_reference` (same arguments, same output): one SDPA call per sample picks
FlashAttention / memory-efficient kernels on GPU and a fused kernel on CPU (about 2.7x the chunked reference for a
2K-token tiny-model step on CPU). It does not compute the log-sum-exp, which the dense model path never uses, and
returns None in its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


def dense_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, block: int = 1024
) -> tuple[Tensor, None]:
    """q [T, Hq, D], k/v [T, Hkv, D], int32 cu_seqlens [B+1]: causal attention within each sample.

    The samples are torch.split views and the outputs one torch.cat: their backward is one gather of the
    gradients, where per-sample slicing gave every sample a zero-filled [T, H, D] gradient to sum (a sixth of a
    tiny-model training step on CPU went to those fills and adds); the values are bit for bit the same."""
    del block  # chunking is the kernels' business here
    lengths = torch.diff(cu_seqlens).tolist()
    per_sample = zip(*(torch.split(x.transpose(0, 1), lengths, dim=1) for x in (q, k, v)), strict=True)
    outs = [
        F.scaled_dot_product_attention(
            qs[None], ks[None], vs[None], is_causal=True, scale=scale, enable_gqa=True
        )[0]
        if qs.shape[1]
        else qs
        for qs, ks, vs in per_sample
    ]
    return torch.cat(outs, dim=1).transpose(0, 1), None


def dense_attention_sdpa_per_sample(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, block: int = 1024
) -> tuple[Tensor, None]:
    """The plain form of dense_attention_sdpa (each sample sliced out and written back): its oracle in the tests
    and its baseline in bench/cpu_train_step.py."""
    del block
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e > s:
            qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            out[s:e] = o.squeeze(0).transpose(0, 1)
    return out, None


def suffix_causal_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [n, Hq, D] are the LAST n rows of a sample span whose keys are k/v [L, Hkv, D] (n <= L): query i sees keys
    0..L-n+i (causal, aligned to the lower right). The context-parallel path: a rank's query rows [u0, u1) of a
    sample starting at s0 over the gathered keys [s0, u1), without padding the queries to the sample start.

    torch's lower-right CausalBias takes FlashAttention on CUDA for fp16/bf16 (GQA heads unexpanded) and a
    materialised mask elsewhere; the memory-efficient kernel it would pick for fp32 on CUDA has no GQA, so KV heads
    are expanded there."""
    n, hq, _ = q.shape
    length, hkv = k.shape[0], k.shape[1]
    if n > length:
        raise ValueError(f"{n} queries over {length} keys: the queries must be a suffix of the key span")
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16) and hq != hkv:
        k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    mask = causal_lower_right(n, length) if n < length else None
    o = F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=ks.shape[1] != qs.shape[1]
    )
    return o.squeeze(0).transpose(0, 1)
