"""One entry point per kernel: the model calls these, and they pick the plain-torch reference or a Triton kernel.

Choice by the environment variable KEYE_KERNELS:
  reference  always the torch reference (the spec; the CPU path)
  triton     always the Triton kernel when one is registered (on CPU only useful under TRITON_INTERPRET=1)
  auto       (default) Triton for CUDA tensors when registered, else the reference; dense attention takes
             torch SDPA (keye/kernels/dense_sdpa.py) on every device
Every Triton function must have exactly the signature of the reference it replaces (see dsa_reference.py and
moe_reference.py); `_triton_table` below is the single place where they plug in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from keye.kernels import block_selection, dsa_reference, indexer_fp8, moe_reference

KERNEL_NAMES = (
    "indexer_topk",
    "sparse_attention",
    "dense_attention",
    "indexer_kl",
    "moe_experts",
    "dsa_decode",
    "decode_attention",
    "block_sparse_attention",
    "block_topk",
    "block_decode",
    "indexer_topk_fp8",
    "dsa_decode_fp8",
    "write_fp8_rows",
)

_REFERENCE: dict[str, Callable[..., object]] = {
    "indexer_topk": dsa_reference.indexer_topk_reference,
    "sparse_attention": dsa_reference.sparse_attention_reference,
    "dense_attention": dsa_reference.dense_attention_reference,
    "indexer_kl": dsa_reference.indexer_kl_reference,
    "moe_experts": moe_reference.experts_reference,
    "dsa_decode": dsa_reference.dsa_decode_reference,
    "decode_attention": dsa_reference.decode_attention_reference,
    "block_sparse_attention": block_selection.block_sparse_attention_reference,
    "block_topk": block_selection.block_topk,
    "block_decode": block_selection.block_decode_reference,  # torch on every device (no Triton kernel yet)
    # dsa.indexer_dtype=fp8: the reference quantises, dequantises and runs the references above
    "indexer_topk_fp8": indexer_fp8.indexer_topk_fp8_reference,
    "dsa_decode_fp8": indexer_fp8.dsa_decode_fp8_reference,
    "write_fp8_rows": indexer_fp8.write_fp8_rows_reference,
}

# Token selections whose neighbouring sets overlap at least this much (mean adjacent Jaccard, sampled) run as the
# union of each query block's sets through the block-sparse kernel (bench/RESULTS.md `## dsa`, per overlap level).
UNION_MIN_OVERLAP = 0.9
UNION_BLOCK = 16


@lru_cache(maxsize=1)
def _triton_table() -> dict[str, Callable[..., object]]:
    """Triton implementations by kernel name. PLUG-IN POINT for the Triton kernels: import them here and return
    e.g. {"sparse_attention": triton_sparse_attention}. Missing names fall back to the reference."""
    try:  # imported lazily: triton may be absent on a bare CPU box
        from keye.kernels.block_sparse_attention import block_sparse_attention as triton_block_sparse
        from keye.kernels.block_topk import block_topk_triton
        from keye.kernels.decode import dsa_decode as triton_dsa_decode
        from keye.kernels.decode import write_fp8_rows as triton_write_fp8_rows
        from keye.kernels.indexer_kl import indexer_kl as triton_indexer_kl
        from keye.kernels.indexer_topk import indexer_topk as triton_indexer_topk
        from keye.kernels.moe import moe_experts as triton_moe_experts
        from keye.kernels.sparse_attention import sparse_attention as triton_sparse_attention
    except ImportError:
        return {}
    return {
        "indexer_topk": triton_indexer_topk,
        "sparse_attention": triton_sparse_attention,
        "indexer_kl": triton_indexer_kl,
        "moe_experts": triton_moe_experts,
        "dsa_decode": triton_dsa_decode,
        "block_sparse_attention": triton_block_sparse,
        "block_topk": block_topk_triton,
        "indexer_topk_fp8": indexer_fp8.indexer_topk_fp8,
        "dsa_decode_fp8": indexer_fp8.dsa_decode_fp8,
        "write_fp8_rows": triton_write_fp8_rows,
    }


# Fast paths that are not Triton (so they serve CPU tensors too under `auto`).
_TORCH_FAST: dict[str, Callable[..., object]] = {}


def _torch_fast() -> dict[str, Callable[..., object]]:
    if not _TORCH_FAST:
        from keye.kernels.dense_sdpa import dense_attention_sdpa

        _TORCH_FAST["dense_attention"] = dense_attention_sdpa
    return _TORCH_FAST


def mode() -> str:
    """The KEYE_KERNELS setting, validated."""
    value = os.environ.get("KEYE_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("reference", "triton", "auto"):
        raise ValueError(f"KEYE_KERNELS must be reference, triton or auto, got {value!r}")
    return value


def pick(name: str, like: Tensor) -> Callable[..., object]:
    """The implementation of kernel `name` to use for tensors like `like`."""
    if name not in _REFERENCE:
        raise KeyError(f"unknown kernel {name!r}; known: {KERNEL_NAMES}")
    chosen = mode()
    if chosen == "reference":
        return _REFERENCE[name]
    if name in _torch_fast():
        return _torch_fast()[name]
    fast = _triton_table().get(name)
    if fast is None:
        return _REFERENCE[name]
    if chosen == "triton" or like.device.type == "cuda":
        return fast
    return _REFERENCE[name]


def fast(name: str, like: Tensor) -> Callable[..., object] | None:
    """The non-reference implementation `pick` takes for `name`, or None when it takes the reference (context
    parallelism calls the fast ones with extra arguments: a query-row offset)."""
    fn = pick(name, like)
    return None if fn is _REFERENCE[name] else fn


def backend_name(name: str, like: Tensor) -> str:
    """'triton' or 'reference': which path `pick` takes (for logs and benchmarks)."""
    fn = pick(name, like)
    if fn is _REFERENCE[name]:
        return "reference"
    return "torch-sdpa" if fn is _torch_fast().get(name) else "triton"


def indexer_topk(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, cu_seqlens: Tensor, topk: int, block: int = 1024
) -> tuple[Tensor, Tensor]:
    return pick("indexer_topk", q_idx)(q_idx, k_idx, w, cu_seqlens, topk, block)


def indexer_topk_fp8(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, cu_seqlens: Tensor, topk: int, block: int = 1024
) -> tuple[Tensor, Tensor]:
    """`indexer_topk` of the FP8 indexer (e4m3 query and keys, per-token scales; keye/kernels/indexer_fp8.py)."""
    return pick("indexer_topk_fp8", q_idx)(q_idx, k_idx, w, cu_seqlens, topk, block)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    fn = pick("sparse_attention", q)
    if fn is not dsa_reference.sparse_attention_reference and torch.are_deterministic_algorithms_enabled():
        # the Triton backward's atomic dk/dv adds in arrival order; the key-major variant sums in a fixed order
        return fn(q, k, v, indices, scale, deterministic=True)
    return fn(q, k, v, indices, scale)


def token_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float, cu_seqlens: Tensor
) -> tuple[Tensor, Tensor]:
    """Sparse attention over per-token selections, by the path their measured overlap favours: on the Triton
    path, sets whose sampled adjacent Jaccard is >= UNION_MIN_OVERLAP go through the union of each UNION_BLOCK
    tokens' sets (block-sparse kernel, membership bits); others through the per-token kernel."""
    fn = pick("block_sparse_attention", q)
    if fn is not _REFERENCE["block_sparse_attention"] and q.shape[0] > UNION_BLOCK:
        if block_selection.adjacent_overlap(indices, cu_seqlens) >= UNION_MIN_OVERLAP:
            bstart = block_selection.block_layout(cu_seqlens, UNION_BLOCK)
            uidx, bits = block_selection.union_of_selections(indices, bstart)
            return fn(q, k, v, uidx, bstart, scale, bits)
    return sparse_attention(q, k, v, indices, scale)


def block_topk(
    q_idx: Tensor, k_idx: Tensor, w: Tensor, cu_seqlens: Tensor, topk: int, block: int
) -> tuple[Tensor, Tensor]:
    return pick("block_topk", q_idx)(q_idx, k_idx, w, cu_seqlens, topk, block)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, bidx: Tensor, bstart: Tensor, scale: float, bits: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    return pick("block_sparse_attention", q)(q, k, v, bidx, bstart, scale, bits)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, block: int = 1024
) -> tuple[Tensor, Tensor]:
    return pick("dense_attention", q)(q, k, v, cu_seqlens, scale, block)


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
) -> Tensor:
    return pick("indexer_kl", q_idx)(q, k, cu_seqlens, scale, q_idx, k_idx, w, indices, block)


def moe_experts(
    x: Tensor, topk_idx: Tensor, topk_weight: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor
) -> Tensor:
    return pick("moe_experts", x)(x, topk_idx, topk_weight, w_gate, w_up, w_down)


def dsa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_idx: Tensor,
    k_idx_cache: Tensor,
    w: Tensor,
    cache_lens: Tensor,
    topk: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return pick("dsa_decode", q)(q, k_cache, v_cache, q_idx, k_idx_cache, w, cache_lens, topk, scale)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """`dsa_decode` over an FP8 indexer key cache (e4m3 rows k8_cache [B, L, D_I], scales k_scale f32 [B, L]); the
    new token's indexer query (q_idx, w in the model dtype) is quantised inside."""
    fn = pick("dsa_decode_fp8", q)
    return fn(q, k_cache, v_cache, q_idx, k8_cache, k_scale, w, cache_lens, topk, scale)


def write_fp8_rows(rows: Tensor, cache8: Tensor, scales: Tensor, lengths: Tensor) -> None:
    """A decode step's new indexer keys into an FP8 key cache (e4m3 row + scale at each sequence's length)."""
    pick("write_fp8_rows", rows)(rows, cache8, scales, lengths)


def block_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_pool: Tensor,
    k_idx_cache: Tensor,
    w_pool: Tensor,
    cache_lens: Tensor,
    topk: int,
    block: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = pick("block_decode", q)
    return fn(q, k_cache, v_cache, q_pool, k_idx_cache, w_pool, cache_lens, topk, block, scale)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return pick("decode_attention", q)(q, k_cache, v_cache, cache_lens, scale)
