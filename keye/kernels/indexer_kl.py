"""Triton DSA indexer loss: mean_t KL(p_t || softmax(I_t)) and its gradient, streamed over keys (no L x L).

Follows DeepSeek-V3.2-Exp's indexer training (dense warm-up: target over all visible keys; sparse stage: target
and logits restricted to the selected set; p_t = head-summed main attention, L1-normalised, detached).
Per token the loss splits into streamable sums: KL_t = sum_s p log p - sum_s p I + logsumexp_s I (sum_s p = 1),
so the forward is one pass over keys once each head's softmax normaliser is known. The gradient w.r.t. I is
(softmax(I) - p) / T; it flows to q_idx and w per token and to k_idx through fp32 atomics.
Spec: `dsa_reference.indexer_kl_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keye.kernels.indexer_topk import row_starts


@triton.jit
def _key_rows(IDX, t, tg, stride_it, a, k0, n_keys, SPARSE: tl.constexpr, BN: tl.constexpr):
    """Rows of key block k0 of token t (global row tg) and their validity: selected indices, or the causal window
    [a, tg]."""
    offs = k0 + tl.arange(0, BN)
    if SPARSE:
        idx = tl.load(IDX + t * stride_it + offs, mask=offs < n_keys, other=-1)
        valid = idx >= 0
        rows = tl.where(valid, idx, 0).to(tl.int64)
    else:
        rows = (a + offs).to(tl.int64)
        valid = rows <= tg
        rows = tl.where(valid, rows, tg)
    return rows, valid


@triton.jit
def _attn_lse_kernel(
    Q, K, IDX, ROW_START, LSE, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_it, stride_lt, topk,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, SPARSE: tl.constexpr, q_row0=0,
):  # fmt: skip
    """Per-head softmax normaliser of the main attention over token t's key set (one program per (t, KV group)).
    Query-side rows are local (t), key-side global (tg = t + q_row0: context parallelism's query offset)."""
    t = tl.program_id(0).to(tl.int64)
    tg = t + q_row0
    hk = tl.program_id(1)
    a = tl.load(ROW_START + tg).to(tl.int64)
    n_keys = topk if SPARSE else tg - a + 1
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    heads = hk * G + offs_g
    q = tl.load(
        Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    for k0 in range(0, n_keys, BN):
        rows, valid = _key_rows(IDX, t, tg, stride_it, a, k0, n_keys, SPARSE, BN)
        kt = tl.load(
            K + rows[None, :] * stride_kt + hk * stride_kh + offs_d[:, None], mask=valid[None, :], other=0.0
        )
        s = tl.where(valid[None, :], tl.dot(q, kt) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(LSE + t * stride_lt + heads, m_i + tl.log(l_i), mask=gmask)


@triton.jit
def _block_probs_and_logits(
    Q, K, QI, KI, W, LSE, t, rows, valid, scale, idx_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_qit, stride_qih, stride_kit, stride_wt,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr,
):  # fmt: skip
    """p [BN] (head-summed main attention / Hq) and the index logits I [BN] of one key block; also x = q_idx.k_idx."""
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    p = tl.zeros([rows.shape[0]], tl.float32)
    for hk in range(HKV):
        heads = hk * G + offs_g
        q = tl.load(
            Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
        )
        lse = tl.load(LSE + t * stride_lt + heads, mask=gmask, other=float("inf"))
        kt = tl.load(
            K + rows[None, :] * stride_kt + hk * stride_kh + offs_d[:, None], mask=valid[None, :], other=0.0
        )
        s = tl.dot(q, kt) * scale
        p += tl.sum(tl.where(gmask[:, None] & valid[None, :], tl.exp(s - lse[:, None]), 0.0), 0)
    p = p / (HKV * G)
    offs_j = tl.arange(0, HIP)
    offs_di = tl.arange(0, DI)
    jmask = offs_j < HI
    qi = tl.load(
        QI + t * stride_qit + offs_j[:, None] * stride_qih + offs_di[None, :], mask=jmask[:, None], other=0.0
    )
    wt = tl.load(W + t * stride_wt + offs_j, mask=jmask, other=0.0).to(tl.float32)
    ki = tl.load(KI + rows[:, None] * stride_kit + offs_di[None, :], mask=valid[:, None], other=0.0)
    x = tl.dot(qi, tl.trans(ki)) * idx_scale  # [HIP, BN]
    logit = tl.sum(wt[:, None] * tl.maximum(x, 0.0), 0)
    logit = tl.where(valid, logit, float("-inf"))
    return p, logit, x, qi, wt, ki


@triton.jit
def _kl_fwd_kernel(
    Q, K, QI, KI, W, IDX, ROW_START, LSE, LOSS, LSE_I, scale, idx_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_qit, stride_qih, stride_kit, stride_wt,
    stride_it, topk,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BN: tl.constexpr, SPARSE: tl.constexpr, q_row0=0,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    tg = t + q_row0
    a = tl.load(ROW_START + tg).to(tl.int64)
    n_keys = topk if SPARSE else tg - a + 1
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    plogp = tl.zeros([], tl.float32)
    pI = tl.zeros([], tl.float32)
    for k0 in range(0, n_keys, BN):
        rows, valid = _key_rows(IDX, t, tg, stride_it, a, k0, n_keys, SPARSE, BN)
        p, logit, x, qi, wt, ki = _block_probs_and_logits(
            Q, K, QI, KI, W, LSE, t, rows, valid, scale, idx_scale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_qit, stride_qih, stride_kit, stride_wt,
            HKV, G, GP, D, HI, HIP, DI,
        )  # fmt: skip
        plogp += tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), 0)
        pI += tl.sum(tl.where(valid, p * logit, 0.0), 0)
        m_new = tl.maximum(m_i, tl.max(logit, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logit - m_safe), 0)
        m_i = m_new
    lse_i = m_i + tl.log(l_i)
    tl.store(LSE_I + t, lse_i)
    tl.store(LOSS + t, plogp - pI + lse_i)


@triton.jit
def _kl_bwd_kernel(
    Q, K, QI, KI, W, IDX, ROW_START, LSE, LSE_I, DQI, DKI, DW, gscale, scale, idx_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_qit, stride_qih, stride_kit, stride_wt,
    stride_it, topk,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BN: tl.constexpr, SPARSE: tl.constexpr, q_row0=0,
):  # fmt: skip
    """dI = (softmax(I) - p) * gscale; back through I = sum_j w_j relu(x_j): dq_idx, dw per token, dk_idx atomics."""
    t = tl.program_id(0).to(tl.int64)
    tg = t + q_row0
    a = tl.load(ROW_START + tg).to(tl.int64)
    n_keys = topk if SPARSE else tg - a + 1
    lse_i = tl.load(LSE_I + t)
    offs_j = tl.arange(0, HIP)
    offs_di = tl.arange(0, DI)
    jmask = offs_j < HI
    dqi = tl.zeros([HIP, DI], tl.float32)
    dw = tl.zeros([HIP], tl.float32)
    for k0 in range(0, n_keys, BN):
        rows, valid = _key_rows(IDX, t, tg, stride_it, a, k0, n_keys, SPARSE, BN)
        p, logit, x, qi, wt, ki = _block_probs_and_logits(
            Q, K, QI, KI, W, LSE, t, rows, valid, scale, idx_scale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_qit, stride_qih, stride_kit, stride_wt,
            HKV, G, GP, D, HI, HIP, DI,
        )  # fmt: skip
        dlogit = tl.where(valid, (tl.exp(logit - lse_i) - p) * gscale, 0.0)  # [BN]
        dw += tl.sum(dlogit[None, :] * tl.maximum(x, 0.0), 1)
        dx = tl.where(x > 0, dlogit[None, :] * wt[:, None], 0.0) * idx_scale  # [HIP, BN]
        dqi += tl.dot(dx, ki.to(tl.float32))
        dki = tl.dot(tl.trans(dx), qi.to(tl.float32))  # [BN, DI]
        tl.atomic_add(DKI + rows[:, None] * DI + offs_di[None, :], dki, mask=valid[:, None], sem="relaxed")
    tl.store(DQI + t * HI * DI + offs_j[:, None] * DI + offs_di[None, :], dqi, mask=jmask[:, None])
    tl.store(DW + t * HI + offs_j, dw, mask=jmask)


def _launch_args(q, k, q_idx, k_idx, w, lse):
    return (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        q_idx.stride(0), q_idx.stride(1), k_idx.stride(0), w.stride(0),
    )  # fmt: skip


def _meta(q: Tensor, k: Tensor, q_idx: Tensor) -> dict:
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    h_i, d_i = q_idx.shape[1], q_idx.shape[2]
    return dict(
        HKV=hkv,
        G=g,
        GP=max(16, triton.next_power_of_2(g)),
        D=d,
        HI=h_i,
        HIP=max(16, triton.next_power_of_2(h_i)),
        DI=d_i,
    )


def indexer_kl_stats(q, k, cu_seqlens, scale, q_idx, k_idx, w, indices, block_n: int = 64, q_row0: int = 0):
    """Forward: (per-token KL [n] f32, main-attention lse [n,Hq], index-logit lse [n], row starts [T]) of the n
    query rows [q_row0, q_row0 + n) (q, q_idx, w, indices hold those; k, k_idx all T rows)."""
    t_total, hq, d = q.shape  # query rows
    if q_row0 < 0 or q_row0 + t_total > k.shape[0]:
        raise ValueError(
            f"query rows [{q_row0}, {q_row0 + t_total}) are not within the {k.shape[0]} key rows"
        )
    meta = _meta(q, k, q_idx)
    starts = row_starts(cu_seqlens, k.shape[0])
    sparse = indices is not None
    idx = indices.to(torch.int32).contiguous() if sparse else starts
    topk = indices.shape[1] if sparse else 0
    stride_it = idx.stride(0)
    lse = torch.empty((t_total, hq), device=q.device, dtype=torch.float32)
    loss = torch.empty(t_total, device=q.device, dtype=torch.float32)
    lse_i = torch.empty(t_total, device=q.device, dtype=torch.float32)
    if t_total == 0:
        return loss, lse, lse_i, starts
    _attn_lse_kernel[(t_total, meta["HKV"])](
        q, k, idx, starts, lse, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), stride_it, lse.stride(0),
        topk, G=meta["G"], GP=meta["GP"], D=d, BN=block_n, SPARSE=sparse, q_row0=q_row0, num_warps=4,
    )  # fmt: skip
    _kl_fwd_kernel[(t_total,)](
        q, k, q_idx, k_idx, w, idx, starts, lse, loss, lse_i, scale, q_idx.shape[2] ** -0.5,
        *_launch_args(q, k, q_idx, k_idx, w, lse), stride_it, topk, BN=block_n, SPARSE=sparse, q_row0=q_row0,
        num_warps=4, **meta,
    )  # fmt: skip
    return loss, lse, lse_i, starts


class IndexerKLFunction(torch.autograd.Function):
    """Scalar loss; gradients w.r.t. q_idx, k_idx, w only (the main-attention target is detached)."""

    @staticmethod
    def forward(ctx, q, k, cu_seqlens, scale, q_idx, k_idx, w, indices, q_row0=0):  # type: ignore[override]
        q, k = q.detach().contiguous(), k.detach().contiguous()
        q_idx, k_idx, w = q_idx.contiguous(), k_idx.contiguous(), w.contiguous()
        loss, lse, lse_i, starts = indexer_kl_stats(
            q, k, cu_seqlens, scale, q_idx, k_idx, w, indices, q_row0=q_row0
        )
        ctx.save_for_backward(
            q, k, q_idx, k_idx, w, indices if indices is not None else starts, lse, lse_i, starts
        )
        ctx.sparse = indices is not None
        ctx.scale = scale
        ctx.q_row0 = q_row0
        return loss.sum() / max(1, q.shape[0])

    @staticmethod
    def backward(ctx, dloss):  # type: ignore[override]
        q, k, q_idx, k_idx, w, idx, lse, lse_i, starts = ctx.saved_tensors
        t_total = q.shape[0]
        meta = _meta(q, k, q_idx)
        dqi = torch.zeros(q_idx.shape, device=q.device, dtype=torch.float32)
        dki = torch.zeros(k_idx.shape, device=q.device, dtype=torch.float32)
        dw = torch.zeros(w.shape, device=q.device, dtype=torch.float32)
        if t_total:
            gscale = float(dloss) / t_total
            _kl_bwd_kernel[(t_total,)](
                q, k, q_idx, k_idx, w, idx, starts, lse, lse_i, dqi, dki, dw, gscale, ctx.scale,
                q_idx.shape[2] ** -0.5, *_launch_args(q, k, q_idx, k_idx, w, lse), idx.stride(0),
                idx.shape[1] if ctx.sparse else 0, BN=64, SPARSE=ctx.sparse, q_row0=ctx.q_row0, num_warps=4,
                **meta,
            )  # fmt: skip
        return None, None, None, None, dqi.to(q_idx.dtype), dki.to(k_idx.dtype), dw.to(w.dtype), None, None


def indexer_kl(
    q: Tensor,
    k: Tensor,
    cu_seqlens: Tensor,
    scale: float,
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    indices: Tensor | None,
    block: int = 1024,
    q_row0: int = 0,
) -> Tensor:
    """Same contract as `indexer_kl_reference` (`block` unused: the kernels stream keys per token).

    q_row0 (context parallelism): q, q_idx, w and indices hold only the n query rows [q_row0, q_row0 + n) of the
    T rows that k, k_idx and cu_seqlens describe; the result is the mean over those n rows (their sum / n), with
    gradients for those rows of q_idx, w and for every row of k_idx. 0: the whole pack."""
    del block
    return IndexerKLFunction.apply(q, k, cu_seqlens, scale, q_idx, k_idx, w, indices, q_row0)


__all__ = ["IndexerKLFunction", "indexer_kl", "indexer_kl_stats"]
