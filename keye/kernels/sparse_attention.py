"""Triton sparse GQA attention over per-token selected keys (DSA), forward with LSE and backward for q, k, v.

Follows DeepSeek-V3.2-Exp's sparse attention (one selected key set per token, shared by all heads) adapted to GQA
as in Keye-VL-2.0; the program layout (one program per (token, KV group), the G query heads of the group as the M
dimension of the tensor-core dot, so each gathered K/V row is loaded once for all G heads) follows the idea of
FlashMLA's sparse prefill and NSA's Triton kernels, written here for GQA. Spec: `dsa_reference.sparse_attention_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _gathered_softmax_step(
    q, KB, VB, IDX_ROW, k0, TOPK, stride_kt, stride_vt, m_i, l_i, acc, sm_scale_log2,
    D: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over selected rows IDX_ROW[k0:k0+BK] (-1 = none) of K/V (KB, VB: the KV head's
    base pointers): gather the rows once for the whole query-head group, update (max, sum, weighted V)."""
    offs_d = tl.arange(0, D)
    offs_k = k0 + tl.arange(0, BK)
    idx = tl.load(IDX_ROW + offs_k, mask=offs_k < TOPK, other=-1)
    valid = idx >= 0
    rows = tl.where(valid, idx, 0).to(tl.int64)
    kt = tl.load(KB + rows[None, :] * stride_kt + offs_d[:, None], mask=valid[None, :], other=0.0)
    s = tl.where(valid[None, :], tl.dot(q, kt) * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(VB + rows[:, None] * stride_vt + offs_d[None, :], mask=valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _softmax_result(m_i, l_i, acc):
    """(o, lse in nats) from the online softmax state (max in log2 units, sum of weights, weighted V sum); rows
    that saw no key give o = 0 and lse = -inf."""
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return o, lse


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, IDX, O, LSE,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_it, stride_ot, stride_oh, stride_lt,
    TOPK,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q = tl.load(
        Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for k0 in range(0, TOPK, BK):
        m_i, l_i, acc = _gathered_softmax_step(
            q, K + hk * stride_kh, V + hk * stride_vh, IDX + t * stride_it, k0, TOPK, stride_kt, stride_vt,
            m_i, l_i, acc, sm_scale_log2, D, BK,
        )  # fmt: skip
    o, lse = _softmax_result(m_i, l_i, acc)
    tl.store(
        O + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        o.to(O.dtype.element_ty),
        mask=gmask[:, None],
    )
    tl.store(LSE + t * stride_lt + heads, lse, mask=gmask)


@triton.jit
def _sparse_bwd_atomic_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,
    sm_scale, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_it, stride_dot, stride_doh, stride_lt,
    stride_dkt, stride_dkh,
    TOPK,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """dq in registers; dk/dv scattered with fp32 atomics into [T, Hkv, D] buffers (fast, order not fixed)."""
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q = tl.load(
        Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    do = tl.load(
        DO + t * stride_dot + heads[:, None] * stride_doh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    lse = tl.load(LSE + t * stride_lt + heads, mask=gmask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + t * stride_lt + heads, mask=gmask, other=0.0)
    dq = tl.zeros([GP, D], tl.float32)
    for k0 in range(0, TOPK, BK):
        offs_k = k0 + tl.arange(0, BK)
        idx = tl.load(IDX + t * stride_it + offs_k, mask=offs_k < TOPK, other=-1)
        valid = idx >= 0
        rows = tl.where(valid, idx, 0).to(tl.int64)
        k = tl.load(
            K + rows[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        v = tl.load(
            V + rows[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * sm_scale
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        dst = rows[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :]
        tl.atomic_add(DK + dst, dk, mask=valid[:, None], sem="relaxed")
        tl.atomic_add(DV + dst, dv, mask=valid[:, None], sem="relaxed")
    dq = dq * sm_scale
    tl.store(
        DQ + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=gmask[:, None],
    )


@triton.jit
def _sparse_bwd_dq_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ,
    sm_scale, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_it, stride_dot, stride_doh, stride_lt,
    TOPK,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """dq only (deterministic path: dk/dv come from the key-major kernel)."""
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q = tl.load(
        Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    do = tl.load(
        DO + t * stride_dot + heads[:, None] * stride_doh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    lse = tl.load(LSE + t * stride_lt + heads, mask=gmask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + t * stride_lt + heads, mask=gmask, other=0.0)
    dq = tl.zeros([GP, D], tl.float32)
    for k0 in range(0, TOPK, BK):
        offs_k = k0 + tl.arange(0, BK)
        idx = tl.load(IDX + t * stride_it + offs_k, mask=offs_k < TOPK, other=-1)
        valid = idx >= 0
        rows = tl.where(valid, idx, 0).to(tl.int64)
        k = tl.load(
            K + rows[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        v = tl.load(
            V + rows[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=valid[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        p = tl.where(valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(
        DQ + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=gmask[:, None],
    )


@triton.jit
def _sparse_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CSR_OFF, CSR_TOK,
    sm_scale, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
    G: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    """Key-major dk/dv: key row s walks the tokens that selected it in ascending order (fixed summation order)."""
    s_row = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    start = tl.load(CSR_OFF + s_row)
    end = tl.load(CSR_OFF + s_row + 1)
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BQ * G)
    kk = tl.load(K + s_row * stride_kt + hk * stride_kh + offs_d).to(tl.float32)
    vv = tl.load(V + s_row * stride_vt + hk * stride_vh + offs_d).to(tl.float32)
    dk = tl.zeros([D], tl.float32)
    dv = tl.zeros([D], tl.float32)
    for j0 in range(start, end, BQ):
        slot = j0 + offs_m // G
        mmask = slot < end
        tok = tl.load(CSR_TOK + slot, mask=mmask, other=0).to(tl.int64)
        head = hk * G + offs_m % G
        qr = tl.load(
            Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=mmask[:, None],
            other=0.0,
        ).to(tl.float32)
        dor = tl.load(
            DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
            mask=mmask[:, None],
            other=0.0,
        ).to(tl.float32)
        lse = tl.load(LSE + tok * stride_lt + head, mask=mmask, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + tok * stride_lt + head, mask=mmask, other=0.0)
        s = tl.sum(qr * kk[None, :], 1) * sm_scale_log2
        p = tl.where(mmask, tl.exp2(s - lse2), 0.0)
        dp = tl.sum(dor * vv[None, :], 1)
        ds = p * (dp - delta)
        dk += tl.sum(ds[:, None] * qr, 0)
        dv += tl.sum(p[:, None] * dor, 0)
    tl.store(DK + s_row * stride_dkt + hk * stride_dkh + offs_d, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + s_row * stride_dkt + hk * stride_dkh + offs_d, dv.to(DV.dtype.element_ty))


def _check(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> tuple[int, int, int, int]:
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or k.shape != v.shape or k.shape[2] != d or indices.shape[0] != t:
        raise ValueError(
            f"bad shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} idx{tuple(indices.shape)}"
        )
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    return t, hq, hkv, d


def _gp(g: int) -> int:
    return max(16, triton.next_power_of_2(g))


def sparse_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float, block_k: int = 64, num_warps: int = 4
) -> tuple[Tensor, Tensor]:
    """(o [T,Hq,D] q.dtype, lse f32 [T,Hq]); same contract as `sparse_attention_reference` (kernel only, no autograd)."""
    t, hq, hkv, d = _check(q, k, v, indices)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    indices = indices.to(torch.int32).contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((t, hq), device=q.device, dtype=torch.float32)
    if t == 0:
        return o, lse
    g = hq // hkv
    _sparse_fwd_kernel[(t, hkv)](
        q, k, v, indices, o, lse, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        indices.stride(0), o.stride(0), o.stride(1), lse.stride(0),
        indices.shape[1], G=g, GP=_gp(g), D=d, BK=block_k, num_warps=num_warps,
    )  # fmt: skip
    return o, lse


def _selection_csr(indices: Tensor, n_keys: int) -> tuple[Tensor, Tensor]:
    """For each key row, the tokens that selected it, ascending (stable sort keeps token order): (offsets, tokens)."""
    topk = indices.shape[1]
    flat = indices.reshape(-1).long()
    keep = flat >= 0
    pos = torch.nonzero(keep).squeeze(1)
    keys = flat[pos]
    order = torch.sort(keys, stable=True).indices
    tokens = (pos[order] // topk).to(torch.int32)
    counts = torch.bincount(keys, minlength=n_keys)
    offsets = torch.zeros(n_keys + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, tokens


def sparse_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    scale: float,
    dlse: Tensor | None = None,
    deterministic: bool = False,
    block_k: int = 64,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `sparse_attention_fwd`. deterministic=True: key-major dk/dv with a fixed summation order
    (bitwise reproducible, slower); default: fp32 atomics."""
    t, hq, hkv, d = _check(q, k, v, indices)
    g = hq // hkv
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    indices = indices.to(torch.int32).contiguous()
    lse = lse.contiguous()
    delta = (o.float() * do.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = torch.empty_like(q)
    n_keys = k.shape[0]
    topk = indices.shape[1]
    args = (
        scale,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
    )
    if t == 0:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    if not deterministic:
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        _sparse_bwd_atomic_kernel[(t, hkv)](
            q, k, v, indices, do, lse, delta, dq, dk, dv, *args,
            indices.stride(0), do.stride(0), do.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
            topk, G=g, GP=_gp(g), D=d, BK=block_k, num_warps=num_warps,
        )  # fmt: skip
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    _sparse_bwd_dq_kernel[(t, hkv)](
        q, k, v, indices, do, lse, delta, dq, *args,
        indices.stride(0), do.stride(0), do.stride(1), lse.stride(0),
        topk, G=g, GP=_gp(g), D=d, BK=block_k, num_warps=num_warps,
    )  # fmt: skip
    offsets, tokens = _selection_csr(indices, n_keys)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bq = max(1, 64 // g)
    _sparse_bwd_dkv_kernel[(n_keys, hkv)](
        q, k, v, do, lse, delta, dk, dv, offsets, tokens, *args,
        do.stride(0), do.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
        G=g, D=d, BQ=bq, num_warps=num_warps,
    )  # fmt: skip
    return dq, dk, dv


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, indices, o, lse); backward runs one of the two backward paths."""

    @staticmethod
    def forward(ctx, q, k, v, indices, scale, deterministic):  # type: ignore[override]
        o, lse = sparse_attention_fwd(q, k, v, indices, scale)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.scale = scale
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # type: ignore[override]
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attention_bwd(q, k, v, indices, o, lse, do, ctx.scale, None, ctx.deterministic)
        return dq, dk, dv, None, None, None


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float, deterministic: bool = False
) -> tuple[Tensor, Tensor]:
    """Differentiable sparse GQA attention (w.r.t. q, k, v); lse is returned detached."""
    return SparseAttentionFunction.apply(q, k, v, indices, scale, deterministic)


__all__ = ["SparseAttentionFunction", "sparse_attention", "sparse_attention_bwd", "sparse_attention_fwd"]
