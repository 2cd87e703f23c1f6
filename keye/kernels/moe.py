"""MoE expert layer on grouped GEMMs: token permutation, torch._grouped_mm experts, fused SwiGLU, un-permutation.

Follows the permute -> grouped GEMM -> unpermute structure of torchtitan's MoE (torch._grouped_mm with int32
group offsets) and Megablocks-style dropless routing; the Triton kernels here do the memory-bound glue without
atomics (their sums run in a fixed order; the GEMMs are torch's). Measured on an H200 (bench/RESULTS.md "## moe"):
62% of the bf16 matmul rate for the whole layer fwd+bwd at 64K tokens, 1.55x a plain grouped_mm layer. Spec: `moe_reference.experts_reference` (weights in x @ W form:
w_gate, w_up [E, H, F], w_down [E, F, H]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keye.kernels.moe_reference import MoEAux, load_balance_loss, route


@triton.jit
def _scatter_rows_kernel(
    SRC, INV, WGT, DST, OTHER, DW,
    H, stride_src, stride_dst, stride_other,
    K: tl.constexpr, BH: tl.constexpr, SCALE: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Token t writes its row (times WGT[t,j] if SCALE) to permuted rows INV[t, j]; with DOT also
    DW[t, j] = <SRC[t], OTHER[INV[t, j]]> (the routing-weight gradient of the un-permutation)."""
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        p = tl.load(INV + t * K + j).to(tl.int64)
        if SCALE:
            wj = tl.load(WGT + t * K + j).to(tl.float32)
        acc = tl.zeros([BH], tl.float32)
        for h0 in range(0, H, BH):
            offs = h0 + tl.arange(0, BH)
            m = offs < H
            row = tl.load(SRC + t * stride_src + offs, mask=m, other=0.0).to(tl.float32)
            if DOT:
                oth = tl.load(OTHER + p * stride_other + offs, mask=m, other=0.0).to(tl.float32)
                acc += row * oth
            if SCALE:
                row = row * wj
            tl.store(DST + p * stride_dst + offs, row.to(DST.dtype.element_ty), mask=m)
        if DOT:
            tl.store(DW + t * K + j, tl.sum(acc, 0))


@triton.jit
def _gather_rows_kernel(
    SRC, INV, WGT, DST,
    H, stride_src, stride_dst,
    K: tl.constexpr, BH: tl.constexpr, SCALE: tl.constexpr,
):  # fmt: skip
    """DST[t] = sum_j (WGT[t, j] *) SRC[INV[t, j]] in fp32, in slot order (deterministic)."""
    t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    offs = pid_h * BH + tl.arange(0, BH)
    m = offs < H
    acc = tl.zeros([BH], tl.float32)
    for j in tl.static_range(K):
        p = tl.load(INV + t * K + j).to(tl.int64)
        row = tl.load(SRC + p * stride_src + offs, mask=m, other=0.0).to(tl.float32)
        if SCALE:
            row = row * tl.load(WGT + t * K + j).to(tl.float32)
        acc += row
    tl.store(DST + t * stride_dst + offs, acc.to(DST.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(G, U, DH, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=m)
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)


def _bh(h: int) -> int:
    return min(triton.next_power_of_2(h), 4096)


def _scatter_rows(
    src: Tensor, inv: Tensor, n_out: int, wgt: Tensor | None = None, other: Tensor | None = None
):
    t, h = src.shape
    k = inv.shape[1]
    dst = torch.empty((n_out, h), device=src.device, dtype=src.dtype)
    dw = torch.empty((t, k), device=src.device, dtype=torch.float32) if other is not None else dst
    if t:
        _scatter_rows_kernel[(t,)](
            src, inv, wgt if wgt is not None else src, dst, other if other is not None else src, dw,
            h, src.stride(0), dst.stride(0), other.stride(0) if other is not None else 0,
            K=k, BH=_bh(h), SCALE=wgt is not None, DOT=other is not None, num_warps=4,
        )  # fmt: skip
    return dst, (dw if other is not None else None)


def _gather_rows(
    src: Tensor, inv: Tensor, n_tokens: int, wgt: Tensor | None = None, out_dtype=None
) -> Tensor:
    h = src.shape[1]
    k = inv.shape[1]
    dst = torch.empty((n_tokens, h), device=src.device, dtype=out_dtype or src.dtype)
    if n_tokens:
        bh = min(_bh(h), 1024)
        _gather_rows_kernel[(n_tokens, triton.cdiv(h, bh))](
            src, inv, wgt if wgt is not None else src, dst, h, src.stride(0), dst.stride(0),
            K=k, BH=bh, SCALE=wgt is not None, num_warps=4,
        )  # fmt: skip
    return dst


class _Permute(torch.autograd.Function):
    """x [T, H] -> xs [T*k, H] grouped by expert; backward sums each token's k row gradients."""

    @staticmethod
    def forward(ctx, x, inv):  # type: ignore[override]
        ctx.save_for_backward(inv)
        ctx.n_tokens = x.shape[0]
        xs, _ = _scatter_rows(x.contiguous(), inv, inv.numel())
        return xs

    @staticmethod
    def backward(ctx, dxs):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return _gather_rows(dxs.contiguous(), inv, ctx.n_tokens), None


class _Unpermute(torch.autograd.Function):
    """y[t] = sum_j w[t,j] ys[inv[t,j]]; backward gives d_ys (scattered dy * w) and dw = <dy, ys>."""

    @staticmethod
    def forward(ctx, ys, inv, w):  # type: ignore[override]
        ys = ys.contiguous()
        w32 = w.float().contiguous()
        ctx.save_for_backward(ys, inv, w32)
        ctx.w_dtype = w.dtype
        return _gather_rows(ys, inv, inv.shape[0], w32)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        ys, inv, w32 = ctx.saved_tensors
        dys, dw = _scatter_rows(dy.contiguous(), inv, ys.shape[0], wgt=w32, other=ys)
        return dys, None, dw.to(ctx.w_dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u, fused (one read of g and u, one write of h; backward recomputes the sigmoid)."""

    @staticmethod
    def forward(ctx, g, u):  # type: ignore[override]
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        out = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, 4096),)](g, u, out, n, BLOCK=4096, num_warps=8)
        return out

    @staticmethod
    def backward(ctx, dh):  # type: ignore[override]
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, 4096),)](g, u, dh, dg, du, n, BLOCK=4096, num_warps=8)
        return dg, du


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """Differentiable fused silu(g) * u."""
    return _SwiGLU.apply(g, u)


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """torch._grouped_mm where it runs (CPU, or bf16 on CUDA); else one matmul per group (same math, autograd)."""
    if a.device.type != "cuda" or (a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16):
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    outs, start = [], 0
    for e, end in enumerate(ends):
        outs.append(a[start:end] @ b[e])
        start = end
    return torch.cat(outs) if outs else a.new_zeros((0, b.shape[-1]))


def permutation(topk_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(inv int32 [T, k]: permuted row of each (token, slot), stable by token within an expert;
    offs int32 [E]: cumulative rows per expert, the group ends torch._grouped_mm takes)."""
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return inv.view(topk_idx.shape).to(torch.int32).contiguous(), offs


def moe_experts(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor
) -> Tensor:
    """Same contract as `experts_reference` (differentiable w.r.t. x, topk_weight and the three weights)."""
    t_total = x.shape[0]
    if t_total == 0:
        return x.new_zeros(x.shape)
    inv, offs = permutation(topk_idx, w_gate.shape[0])
    xs = _Permute.apply(x, inv)
    g = _grouped_mm(xs, w_gate, offs)
    u = _grouped_mm(xs, w_up, offs)
    h = swiglu(g, u)
    ys = _grouped_mm(h, w_down, offs)
    return _Unpermute.apply(ys, inv, topk_weight)


def moe_layer(
    x: Tensor,
    w_router: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    bias: Tensor | None = None,
) -> tuple[Tensor, MoEAux]:
    """Whole MoE layer (router matmul x @ w_router [H, E], softmax top-k routing, grouped-GEMM experts)."""
    logits = x @ w_router
    topk_idx, topk_weight, probs = route(logits, top_k, norm_topk_prob, bias)
    y = moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    num_experts = w_gate.shape[0]
    aux = MoEAux(
        load_balance_loss=load_balance_loss(probs, topk_idx, num_experts),
        expert_counts=torch.bincount(topk_idx.reshape(-1), minlength=num_experts),
        router_probs=probs,
    )
    return y, aux


__all__ = ["moe_experts", "moe_layer", "permutation", "swiglu"]
