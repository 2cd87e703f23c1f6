"""Native-resolution vision encoder: SigLIP (so400m-patch14) blocks with NaViT packing, the learned position table
bicubically resized to each frame's grid (as SigLIP's interpolate_pos_encoding), plus Keye-VL's 2D RoPE.

Follows transformers' SiglipVisionModel (parameter names kept so SigLIP checkpoints map 1:1), NaViT (Dehghani et
al. 2023) for packing frames of different sizes with cu_seqlens, and Keye-VL-1.5 / Qwen2-VL for the 2D RoPE.
Patches of a frame are in raster order (row-major over the patch grid), each flattened as (C, P, P).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye.model.config import VisionConfig
from keye.model.rope import apply_rope, vision_rope_cos_sin


def frame_grids(patch_grids: Tensor) -> list[tuple[int, int]]:
    """(h, w) of every frame; a (t, h, w) row with t > 1 stands for t frames of the same size."""
    out: list[tuple[int, int]] = []
    for t, h, w in patch_grids.tolist():
        out.extend([(int(h), int(w))] * int(t))
    return out


def grid_cu_seqlens(grids: list[tuple[int, int]], device: torch.device | None = None) -> Tensor:
    lens = torch.tensor([0] + [h * w for h, w in grids], dtype=torch.int64)
    return torch.cumsum(lens, 0).to(torch.int32).to(device)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.pos_grid * cfg.pos_grid, cfg.hidden_size)

    def positions_for(self, grids: list[tuple[int, int]]) -> Tensor:
        """Learned table resized to each grid (bicubic, as SigLIP); identity when the grid is the native one."""
        g = self.cfg.pos_grid
        table = self.position_embedding.weight
        cache: dict[tuple[int, int], Tensor] = {}
        parts = []
        for h, w in grids:
            if (h, w) not in cache:
                if (h, w) == (g, g):
                    cache[(h, w)] = table
                else:
                    img = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)
                    res = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
                    cache[(h, w)] = res.permute(0, 2, 3, 1).reshape(h * w, -1)
            parts.append(cache[(h, w)])
        return torch.cat(parts)

    def forward(self, pixel_patches: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        weight = self.patch_embedding.weight
        x = F.linear(
            pixel_patches.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.patch_embedding.bias
        )
        return x + self.positions_for(grids).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, lengths: list[int], rope: tuple[Tensor, Tensor] | None) -> Tensor:
        n, d = x.shape
        h, hd = self.cfg.num_heads, self.cfg.head_dim
        q = self.q_proj(x).view(n, h, hd)
        k = self.k_proj(x).view(n, h, hd)
        v = self.v_proj(x).view(n, h, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if len(set(lengths)) == 1:  # all frames the same size: one batched call
            b, m = len(lengths), lengths[0]
            qb, kb, vb = (t.view(b, m, h, hd).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(n, d)
        else:  # bidirectional attention inside each frame only: one batched call per frame size
            o = _attention_by_size(q, k, v, lengths)
        return self.out_proj(o)


def _attention_by_size(q: Tensor, k: Tensor, v: Tensor, lengths: list[int]) -> Tensor:
    """Frames of mixed sizes [N, h, hd] -> [N, h * hd]: the rows of each size's frames gathered into one batch.
    A call per frame cost five times as much on CPU (each frame's slice sent a zero-filled [N, h, hd] gradient
    back); each frame's values are bit for bit those of its own call."""
    n, h, hd = q.shape
    starts = [0, *itertools.accumulate(lengths)][:-1]
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(lengths):
        by_size.setdefault(m, []).append(i)
    rows = [r for m, frames in by_size.items() for i in frames for r in range(starts[i], starts[i] + m)]
    perm = torch.tensor(rows, device=q.device)
    sizes = [len(frames) * m for m, frames in by_size.items()]
    outs = []
    for (m, frames), qs, ks, vs in zip(
        by_size.items(), *(torch.split(t[perm], sizes) for t in (q, k, v)), strict=True
    ):
        qb, kb, vb = (t.view(len(frames), m, h, hd).transpose(1, 2) for t in (qs, ks, vs))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(-1, h * hd))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=q.device)
    return torch.cat(outs)[inverse]


def _attention_per_frame(q: Tensor, k: Tensor, v: Tensor, lengths: list[int]) -> Tensor:
    """The plain form of _attention_by_size (one call per frame): its oracle in the tests and its baseline in
    bench/cpu_train_step.py."""
    outs, start = [], 0
    for m in lengths:
        qb, kb, vb = (t[start : start + m].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1).reshape(m, -1))
        start += m
    return torch.cat(outs)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, lengths: list[int], rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), lengths, rope)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(cfg) for _ in range(cfg.num_layers)])


class VisionTransformer(nn.Module):
    """pixel_patches [N, C*P*P] + patch_grids int [n, 3] (t, h, w) -> features [N, D] (raster order per frame)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_patches: Tensor, patch_grids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        grids = frame_grids(patch_grids)
        lengths = [h * w for h, w in grids]
        if cu_seqlens is not None:
            given = torch.diff(cu_seqlens.to(torch.int64)).tolist()
            if given != lengths:
                raise ValueError(
                    f"vision cu_seqlens {given[:8]}... disagree with patch_grids {lengths[:8]}..."
                )
        if sum(lengths) != pixel_patches.shape[0]:
            raise ValueError(f"patch_grids cover {sum(lengths)} patches, got {pixel_patches.shape[0]}")
        x = self.embeddings(pixel_patches, grids)
        rope = None
        if self.cfg.rope_2d:
            cos, sin = vision_rope_cos_sin(grids, self.cfg.head_dim, self.cfg.rope_theta)
            rope = (cos.to(x.device), sin.to(x.device))
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, lengths, rope, use_reentrant=False)
            else:
                x = layer(x, lengths, rope)
        return self.post_layernorm(x)
