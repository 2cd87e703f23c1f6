"""LM self-attention: Qwen3 GQA with QK-norm and M-RoPE, in three modes per layer (Keye-VL-2.0 / DeepSeek-V3.2):

  dense       causal per-sample attention (cu_seqlens)
  dsa_warmup  dense attention; the lightning indexer learns from KL to the head-summed attention distribution
  dsa         top-k keys per query token from the indexer (one set shared by all heads, each KV group attends
              over it); indexer input detached, its KL restricted to the selected set. With dsa.selection=block,
              one set per query block of dsa.selection_block tokens from the block's pooled indexer query
              (keye/kernels/block_selection.py); each token attends to its block's keys at or before itself.
              Decode pools the block's rows so far (KVCache.pool_block; a prefill's blocks pool the whole block)

dsa.indexer_dtype=fp8 (token selection only; block selection stays in the model dtype): the top-k runs the FP8
indexer (e4m3 queries/keys, per-token scales; dispatch.indexer_topk_fp8), the KV cache keeps the indexer keys as
e4m3 rows + scales and decode selects over them (dispatch.dsa_decode_fp8). Only the selection is quantised: the
indexer's KL (its training signal) stays on the unquantised queries/keys.

The heavy functions come from keye.kernels.dispatch (torch reference on CPU, Triton on CUDA when available).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from keye.kernels import block_selection, dispatch
from keye.model.cache import KVCache
from keye.model.config import LMConfig
from keye.model.indexer import LightningIndexer
from keye.model.norm import RMSNorm
from keye.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.indexer = LightningIndexer(cfg.hidden_size, cfg.dsa)
        self.scale = d**-0.5
        self.force_indexer_loss = False  # compute the KL in eval mode too (diagnostics)
        self.cp = (
            None  # keye.model.context_parallel.CPContext: x holds this rank's rows of a pack split over cp
        )
        self.shared_prefix = None  # keye.model.shared_prefix.PrefixLayout: samples continuing one prefix

    @property
    def mode(self) -> str:
        return self.cfg.mode_of(self.layer_idx)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        rope_idx: tuple[Tensor, Tensor],
        cu_seqlens: Tensor,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x [T, H] -> (out [T, H], indexer KL loss or None)."""
        t = x.shape[0]
        hq, hkv, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(t, hq, d)), *rope)
        k = apply_rope(self.k_norm(self.k_proj(x).view(t, hkv, d)), *rope)
        v = self.v_proj(x).view(t, hkv, d)
        mode = self.mode
        q_idx = k_idx = w = None
        if mode != "dense":
            q_idx, k_idx, w = self.indexer(x.detach(), *rope_idx)

        if self.cp is not None:
            return self._context_parallel(x, q, k, v, q_idx, k_idx, w, cache)
        if self.shared_prefix is not None and mode == "dense" and not (cache is not None and cache.decoding):
            from keye.model.shared_prefix import prefix_attention

            layout = self.shared_prefix
            if cache is not None:
                cache.write_prefill_shared(self.layer_idx, k, v, layout.prefix_len, layout.cu_seqlens)
            o = prefix_attention(q, k, v, layout, self.scale)
            return self.o_proj(o.reshape(t, hq * d)), None
        if cache is not None and cache.decoding:
            cache.write_decode(self.layer_idx, k, v, k_idx)
            o = self._decode(q, cache, q_idx, w)
            return self.o_proj(o.reshape(t, hq * d)), None
        if cache is not None:
            cache.write_prefill(self.layer_idx, k, v, k_idx, cu_seqlens)
            if mode == "dsa" and self.cfg.dsa.selection == "block":
                cache.write_block_pool(self.layer_idx, q_idx, w, cu_seqlens, self.cfg.dsa.selection_block)

        indices = None
        block = self.cfg.dsa.block
        want_kl = mode != "dense" and ((self.training and torch.is_grad_enabled()) or self.force_indexer_loss)
        # top-k covering every sample selects all visible keys: sparse == dense, so take the exact dense path
        covers = int(torch.diff(cu_seqlens).max()) <= self.cfg.dsa.topk if t else True
        by_block = self.cfg.dsa.selection == "block"
        if mode == "dsa" and (not covers or want_kl) and by_block:
            bidx, bstart = dispatch.block_topk(
                q_idx.detach(), k_idx.detach(), w.detach(), cu_seqlens, self.cfg.dsa.topk,
                self.cfg.dsa.selection_block,
            )  # fmt: skip
            indices = block_selection.expand_block_indices(bidx, bstart, t) if want_kl else None
        elif mode == "dsa" and (not covers or want_kl):
            topk_fn = dispatch.indexer_topk_fp8 if self.cfg.dsa.fp8_indexer else dispatch.indexer_topk
            indices, _ = topk_fn(
                q_idx.detach(), k_idx.detach(), w.detach(), cu_seqlens, self.cfg.dsa.topk, block
            )
        if mode == "dsa" and not covers and by_block:
            o, _ = dispatch.block_sparse_attention(q, k, v, bidx, bstart, self.scale)
        elif mode == "dsa" and not covers:
            o, _ = dispatch.token_sparse_attention(q, k, v, indices, self.scale, cu_seqlens)
        else:
            o, _ = dispatch.dense_attention(q, k, v, cu_seqlens, self.scale, block)
        kl = None
        if want_kl:
            kl = dispatch.indexer_kl(
                q.detach(), k.detach(), cu_seqlens, self.scale, q_idx, k_idx, w, indices, block
            )
        return self.o_proj(o.reshape(t, hq * d)), kl

    def _context_parallel(self, x, q, k, v, q_idx, k_idx, w, cache) -> tuple[Tensor, Tensor | None]:  # noqa: ANN001
        """Attention of this rank's rows over the whole pack's keys (keye.model.context_parallel)."""
        from keye.model import context_parallel

        if cache is not None or self.cfg.dsa.selection == "block" or self.cfg.dsa.fp8_indexer:
            raise NotImplementedError(
                "context parallelism covers training with token selection (no cache, no block, no FP8 indexer)"
            )
        mode, dsa = self.mode, self.cfg.dsa
        want_kl = mode != "dense" and ((self.training and torch.is_grad_enabled()) or self.force_indexer_loss)
        covers = int(torch.diff(self.cp.cu_seqlens).max()) <= dsa.topk
        o, kl = context_parallel.attention(
            q, k, v, self.cp, self.scale, mode, dsa.topk, dsa.block, q_idx, k_idx, w, want_kl, covers
        )
        t, hq, d = q.shape
        return self.o_proj(o.reshape(t, hq * d)), kl

    def _decode(self, q: Tensor, cache: KVCache, q_idx: Tensor | None, w: Tensor | None) -> Tensor:
        """One query per sequence over its cached rows 0..lengths[b] (the new token included)."""
        i = self.layer_idx
        lens = cache.lengths + 1
        if self.mode == "dsa" and self.cfg.dsa.selection == "block":
            dsa = self.cfg.dsa
            q_pool, w_pool = cache.pool_block(i, q_idx, w, dsa.selection_block)
            o, _, _ = dispatch.block_decode(
                q, cache.k[i], cache.v[i], q_pool, cache.idx_k[i], w_pool, lens, dsa.topk, dsa.selection_block,
                self.scale,
            )  # fmt: skip
        elif self.mode == "dsa" and cache.fp8_indexer:
            o, _, _ = dispatch.dsa_decode_fp8(
                q, cache.k[i], cache.v[i], q_idx, cache.idx_k[i], cache.idx_scale[i], w, lens, self.cfg.dsa.topk,
                self.scale,
            )  # fmt: skip
        elif self.mode == "dsa":
            o, _, _ = dispatch.dsa_decode(
                q, cache.k[i], cache.v[i], q_idx, cache.idx_k[i], w, lens, self.cfg.dsa.topk, self.scale
            )
        else:
            o, _ = dispatch.decode_attention(q, cache.k[i], cache.v[i], lens, self.scale)
        return o
