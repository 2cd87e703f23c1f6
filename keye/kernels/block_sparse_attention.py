"""Triton block-sparse GQA attention: one key list per query block, forward (with LSE) and backward for q, k, v.

Serves both DSA selection modes (keye/kernels/block_selection.py): block-shared (one top-k set per block, causal
inside it) and the union of a block's per-token selections (membership bits per token). A program takes BQ tokens of
one block and one KV group: its tensor-core tile is BQ x G query rows (token-major, the G heads of each token) against
BK gathered key rows, so each gathered K/V row serves BQ x G rows instead of the G heads of one token (padded to 16)
in keye/kernels/sparse_attention.py; the backward sums dK/dV over those rows before one atomic add per row.
Spec: `block_selection.block_sparse_attention_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634


@triton.jit
def _tile_rows(BSTART, pid, hk, SUB, G: tl.constexpr, BQ: tl.constexpr):
    """(block b, token of each tile row, head of each row, row mask) of program pid."""
    b = pid // SUB
    t0 = tl.load(BSTART + b) + (pid % SUB) * BQ
    t1 = tl.load(BSTART + b + 1)
    offs_m = tl.arange(0, BQ * G)
    tok = (t0 + offs_m // G).to(tl.int64)
    head = hk * G + offs_m % G
    return b, tok, head, tok < t1


@triton.jit
def _tile_keep(BITS, idx, valid, offs_k, tok, rmask, stride_bt, HAS_BITS: tl.constexpr):
    """[rows, BK] mask: key slot visible to the row's token (causal in the list, or its membership bit)."""
    if HAS_BITS:
        word = tl.load(
            BITS + tok[:, None] * stride_bt + (offs_k // 32)[None, :],
            mask=rmask[:, None] & valid[None, :],
            other=0,
        )
        keep = ((word >> (offs_k % 32)[None, :]) & 1) != 0
    else:
        keep = idx[None, :] <= tok[:, None]
    return keep & valid[None, :] & rmask[:, None]


@triton.jit
def _block_fwd_kernel(
    Q, K, V, BIDX, BSTART, BITS, O, LSE,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bi, stride_bt, stride_ot, stride_oh, stride_lt,
    U, SUB,
    G: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, HAS_BITS: tl.constexpr,
):  # fmt: skip
    hk = tl.program_id(1)
    b, tok, head, rmask = _tile_rows(BSTART, tl.program_id(0), hk, SUB, G, BQ)
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    m_i = tl.full([BQ * G], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ * G], tl.float32)
    acc = tl.zeros([BQ * G, D], tl.float32)
    if tl.max(rmask.to(tl.int32), 0) > 0:
        for k0 in range(0, U, BK):
            offs_k = k0 + tl.arange(0, BK)
            idx = tl.load(BIDX + b * stride_bi + offs_k, mask=offs_k < U, other=-1)
            valid = idx >= 0
            rows = tl.where(valid, idx, 0).to(tl.int64)
            kt = tl.load(
                K + rows[None, :] * stride_kt + hk * stride_kh + offs_d[:, None],
                mask=valid[None, :],
                other=0.0,
            )
            keep = _tile_keep(BITS, idx, valid, offs_k, tok, rmask, stride_bt, HAS_BITS)
            s = tl.where(keep, tl.dot(q, kt) * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + rows[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(
        O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(O.dtype.element_ty),
        mask=rmask[:, None],
    )
    tl.store(LSE + tok * stride_lt + head, lse, mask=rmask)


@triton.jit
def _block_bwd_kernel(
    Q, K, V, BIDX, BSTART, BITS, DO, LSE, DELTA, DQ, DK, DV,
    sm_scale, sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bi, stride_bt, stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
    U, SUB,
    G: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, HAS_BITS: tl.constexpr,
):  # fmt: skip
    """dq in registers; dK/dV of each gathered chunk summed over the tile's BQ x G rows, then one fp32 atomic add."""
    hk = tl.program_id(1)
    b, tok, head, rmask = _tile_rows(BSTART, tl.program_id(0), hk, SUB, G, BQ)
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    lse = tl.load(LSE + tok * stride_lt + head, mask=rmask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + tok * stride_lt + head, mask=rmask, other=0.0)
    dq = tl.zeros([BQ * G, D], tl.float32)
    if tl.max(rmask.to(tl.int32), 0) > 0:
        for k0 in range(0, U, BK):
            offs_k = k0 + tl.arange(0, BK)
            idx = tl.load(BIDX + b * stride_bi + offs_k, mask=offs_k < U, other=-1)
            valid = idx >= 0
            rows = tl.where(valid, idx, 0).to(tl.int64)
            k = tl.load(
                K + rows[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            v = tl.load(
                V + rows[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            keep = _tile_keep(BITS, idx, valid, offs_k, tok, rmask, stride_bt, HAS_BITS)
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * sm_scale
            dv = tl.dot(tl.trans(p.to(do.dtype)), do)
            dst = rows[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :]
            tl.atomic_add(DK + dst, dk, mask=valid[:, None], sem="relaxed")
            tl.atomic_add(DV + dst, dv, mask=valid[:, None], sem="relaxed")
    tl.store(
        DQ + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=rmask[:, None],
    )


def _check(q: Tensor, k: Tensor, v: Tensor, bidx: Tensor, bstart: Tensor) -> tuple[int, int, int, int]:
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or k.shape != v.shape or k.shape[2] != d or bidx.shape[0] != bstart.numel() - 1:
        raise ValueError(
            f"bad shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} bidx{tuple(bidx.shape)} "
            f"bstart{tuple(bstart.shape)}"
        )
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    return t, hq, hkv, d


def _tile(g: int, bq: int) -> int:
    """Tokens per program: a power of two with bq x G >= 16 rows (the tensor-core minimum)."""
    return max(triton.next_power_of_2(bq), triton.next_power_of_2(max(1, 16 // g)))


def _grid(bstart: Tensor, bq: int, hkv: int) -> tuple[tuple[int, int], int]:
    lens = bstart[1:] - bstart[:-1]
    longest = int(lens.max()) if lens.numel() else 0
    sub = max(1, triton.cdiv(longest, bq))
    return (lens.numel() * sub, hkv), sub


def _prep(bidx: Tensor, bstart: Tensor, bits: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    bidx = bidx.to(torch.int32).contiguous()
    bstart = bstart.to(device=q.device, dtype=torch.int32).contiguous()
    bits_t = bits.to(torch.int32).contiguous() if bits is not None else bidx  # unused pointer when no bits
    return bidx, bstart, bits_t


def block_sparse_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, bidx: Tensor, bstart: Tensor, scale: float, bits: Tensor | None = None,
    block_q: int = 16, block_k: int = 32, num_warps: int = 4,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(o [T,Hq,D] q.dtype, lse f32 [T,Hq]); contract of `block_sparse_attention_reference` (no autograd).
    Default tile from the H200 variants at 128K, block-shared (bench/RESULTS.md): 16/32/4 16.5 ms, 32/32/8 17.4,
    8/64/4 18.0, 16/64/8 18.5."""
    t, hq, hkv, d = _check(q, k, v, bidx, bstart)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bidx, bstart, bits_t = _prep(bidx, bstart, bits, q)
    o = torch.zeros_like(q)
    lse = torch.full((t, hq), float("-inf"), device=q.device, dtype=torch.float32)
    if t == 0 or bidx.shape[0] == 0:
        return o, lse
    g = hq // hkv
    bq = _tile(g, block_q)
    grid, sub = _grid(bstart, bq, hkv)
    _block_fwd_kernel[grid](
        q, k, v, bidx, bstart, bits_t, o, lse, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        bidx.stride(0), bits_t.stride(0), o.stride(0), o.stride(1), lse.stride(0),
        bidx.shape[1], sub, G=g, BQ=bq, D=d, BK=block_k, HAS_BITS=bits is not None, num_warps=num_warps,
    )  # fmt: skip
    return o, lse


def block_sparse_attention_bwd(
    q: Tensor, k: Tensor, v: Tensor, bidx: Tensor, bstart: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    scale: float, bits: Tensor | None = None, block_q: int = 16, block_k: int = 64, num_warps: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv) of `block_sparse_attention_fwd` (fp32 atomics for dk/dv: order not fixed). Default tile from
    the H200 variants at 128K (bench/RESULTS.md): 16/64/8 50 ms, 16/32/8 64, 8/64/4 105."""
    t, hq, hkv, d = _check(q, k, v, bidx, bstart)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    bidx, bstart, bits_t = _prep(bidx, bstart, bits, q)
    lse = lse.contiguous()
    delta = (o.float() * do.float()).sum(-1).contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if t == 0 or bidx.shape[0] == 0:
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    g = hq // hkv
    bq = _tile(g, block_q)
    grid, sub = _grid(bstart, bq, hkv)
    _block_bwd_kernel[grid](
        q, k, v, bidx, bstart, bits_t, do, lse, delta, dq, dk, dv, scale, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        bidx.stride(0), bits_t.stride(0), do.stride(0), do.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
        bidx.shape[1], sub, G=g, BQ=bq, D=d, BK=block_k, HAS_BITS=bits is not None, num_warps=num_warps,
    )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, bidx, bstart, bits, o, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, bidx, bstart, scale, bits):  # type: ignore[override]
        o, lse = block_sparse_attention_fwd(q, k, v, bidx, bstart, scale, bits)
        ctx.save_for_backward(q, k, v, bidx, bstart, o, lse, *(() if bits is None else (bits,)))
        ctx.scale = scale
        ctx.has_bits = bits is not None
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):  # type: ignore[override]
        q, k, v, bidx, bstart, o, lse, *rest = ctx.saved_tensors
        bits = rest[0] if ctx.has_bits else None
        dq, dk, dv = block_sparse_attention_bwd(q, k, v, bidx, bstart, o, lse, do, ctx.scale, bits)
        return dq, dk, dv, None, None, None, None


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, bidx: Tensor, bstart: Tensor, scale: float, bits: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Differentiable block-sparse GQA attention (w.r.t. q, k, v); lse is returned detached."""
    return BlockSparseAttentionFunction.apply(q, k, v, bidx, bstart, scale, bits)


__all__ = [
    "BlockSparseAttentionFunction",
    "block_sparse_attention",
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
]
