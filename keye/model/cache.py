"""KV cache for batched generation: per layer K, V and (for DSA decode) the indexer keys, one row per sequence.

Prefill writes each packed sample's rows into its own batch row; decode appends one token per sequence. The layout
([B, L_max, H_kv, D]) matches the packed per-token tensors of the model, so no transposes are needed.

With dsa.indexer_dtype=fp8 (token selection) the indexer keys are stored as e4m3 rows plus one float32 scale per row
(`idx_scale`, keye/kernels/indexer_fp8.py `quantize_indexer_keys`): 1 + 4/D_I bytes per indexer dim instead of 2,
so the decode top-k reads about half the bytes of a bf16 cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from keye.kernels import dispatch
from keye.kernels.indexer_fp8 import FP8, quantize_indexer_keys
from keye.model.config import LMConfig


@dataclass
class KVCache:
    k: list[Tensor]
    v: list[Tensor]
    idx_k: list[Tensor]
    lengths: Tensor  # int64 [B]: tokens already committed per sequence
    decoding: bool = False
    max_len: int = 0
    extra: dict[str, Tensor] = field(default_factory=dict)
    # dsa.selection=block: per layer, the sums of the indexer queries [B, H_I, D_I] and weights [B, H_I] (float32)
    # of each sequence's unfinished block, so a decode step scores with its block's pooled query as training did
    pool_q: list[Tensor] = field(default_factory=list)
    pool_w: list[Tensor] = field(default_factory=list)
    # dsa.indexer_dtype=fp8: per layer, float32 [B, L_max] scales of the e4m3 rows of idx_k (empty: idx_k unscaled)
    idx_scale: list[Tensor] = field(default_factory=list)

    @property
    def fp8_indexer(self) -> bool:
        return bool(self.idx_scale)

    @classmethod
    def allocate(
        cls, cfg: LMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        n = cfg.num_layers
        by_block = cfg.dsa.selection == "block"
        h_i, d_i = cfg.dsa.index_heads, cfg.dsa.index_dim
        fp8 = cfg.dsa.fp8_indexer
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            idx_k=[
                torch.zeros(batch, max_len, d_i, dtype=FP8 if fp8 else dtype, device=device) for _ in range(n)
            ],
            idx_scale=[torch.ones(batch, max_len, device=device) for _ in range(n)] if fp8 else [],
            lengths=torch.zeros(batch, dtype=torch.int64, device=device),
            max_len=max_len,
            pool_q=[torch.zeros(batch, h_i, d_i, device=device) for _ in range(n)] if by_block else [],
            pool_w=[torch.zeros(batch, h_i, device=device) for _ in range(n)] if by_block else [],
        )

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def write_prefill(
        self, layer: int, k: Tensor, v: Tensor, idx_k: Tensor | None, cu_seqlens: Tensor
    ) -> None:
        """Packed rows of sample b -> cache row b, positions 0..len_b-1."""
        cu = cu_seqlens.tolist()
        for b in range(len(cu) - 1):
            a, e = int(cu[b]), int(cu[b + 1])
            if e - a > self.max_len:
                raise ValueError(f"prompt of {e - a} tokens exceeds the cache length {self.max_len}")
            self.k[layer][b, : e - a] = k[a:e]
            self.v[layer][b, : e - a] = v[a:e]
            if idx_k is not None:
                self._write_idx(layer, (b, slice(0, e - a)), idx_k[a:e])

    def write_prefill_shared(
        self, layer: int, k: Tensor, v: Tensor, prefix_len: int, cu_seqlens: Tensor
    ) -> None:
        """Prefill in keye.model.shared_prefix's layout [prefix | rest_1 | ...]: row b holds the prefix then rest b
        (dense layers only: no indexer keys)."""
        cu = cu_seqlens.tolist()
        for b in range(len(cu) - 2):
            a, e = int(cu[b + 1]), int(cu[b + 2])
            if prefix_len + e - a > self.max_len:
                raise ValueError(
                    f"prompt of {prefix_len + e - a} tokens exceeds the cache length {self.max_len}"
                )
            self.k[layer][b, :prefix_len] = k[:prefix_len]
            self.v[layer][b, :prefix_len] = v[:prefix_len]
            self.k[layer][b, prefix_len : prefix_len + e - a] = k[a:e]
            self.v[layer][b, prefix_len : prefix_len + e - a] = v[a:e]

    def write_block_pool(self, layer: int, q_idx: Tensor, w: Tensor, cu_seqlens: Tensor, block: int) -> None:
        """Prefill, block selection: each sequence's sums over its last unfinished block (zero when the prompt
        ends on a block boundary: the first decoded token opens a new block)."""
        cu = cu_seqlens.tolist()
        for b in range(len(cu) - 1):
            a, e = int(cu[b]), int(cu[b + 1])
            r = (e - a) % block
            self.pool_q[layer][b] = q_idx[e - r : e].float().sum(0)
            self.pool_w[layer][b] = w[e - r : e].float().sum(0)

    def pool_block(self, layer: int, q_idx: Tensor, w: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """Decode, block selection: add each new token (row lengths[b]) to its block's sums, restarting at a
        block's first row; returns the block means (q_pool in q_idx's dtype as `pooled_queries` gives them,
        w_pool float32)."""
        pos = self.lengths
        fresh = (pos % block == 0).to(q_idx.device)
        qs = torch.where(fresh[:, None, None], 0.0, self.pool_q[layer]) + q_idx.float()
        ws = torch.where(fresh[:, None], 0.0, self.pool_w[layer]) + w.float()
        self.pool_q[layer], self.pool_w[layer] = qs, ws
        n = (pos % block + 1).to(qs.device, torch.float32)
        return (qs / n[:, None, None]).to(q_idx.dtype), ws / n[:, None]

    def write_decode(self, layer: int, k: Tensor, v: Tensor, idx_k: Tensor | None) -> None:
        """One new token per sequence (k, v [B, H_kv, D]) at position lengths[b]."""
        if int(self.lengths.max()) >= self.max_len:
            raise ValueError(f"KV cache of length {self.max_len} is full")
        rows = torch.arange(self.batch, device=self.lengths.device)
        self.k[layer][rows, self.lengths] = k
        self.v[layer][rows, self.lengths] = v
        if idx_k is not None and self.fp8_indexer:  # one fused launch on the GPU (quantise + write)
            dispatch.write_fp8_rows(idx_k, self.idx_k[layer], self.idx_scale[layer], self.lengths)
        elif idx_k is not None:
            self._write_idx(layer, (rows, self.lengths), idx_k)

    def _write_idx(self, layer: int, at: tuple, idx_k: Tensor) -> None:
        """Indexer key rows into idx_k[layer][at], quantised per row when the cache is FP8."""
        if self.fp8_indexer:
            k8, sk = quantize_indexer_keys(idx_k)
            self.idx_k[layer][at] = k8
            self.idx_scale[layer][at] = sk
        else:
            self.idx_k[layer][at] = idx_k

    def take_rows(self, rows: Tensor) -> KVCache:
        """A cache whose row i is a copy of row rows[i] of this one: prompts prefilled once, decoded many times
        (a group of samples of one prompt)."""
        rows = rows.to(self.lengths.device)

        def pick(ts: list[Tensor]) -> list[Tensor]:
            return [t.index_select(0, rows) for t in ts]

        return KVCache(
            k=pick(self.k),
            v=pick(self.v),
            idx_k=pick(self.idx_k),
            lengths=self.lengths.index_select(0, rows),
            decoding=self.decoding,
            max_len=self.max_len,
            extra={name: t.index_select(0, rows) for name, t in self.extra.items()},
            pool_q=pick(self.pool_q),
            pool_w=pick(self.pool_w),
            idx_scale=pick(self.idx_scale),
        )

    def set_lengths(self, lengths: Tensor) -> None:
        self.lengths = lengths.to(self.lengths.device, torch.int64)

    def advance(self, n: int = 1) -> None:
        self.lengths = self.lengths + n
