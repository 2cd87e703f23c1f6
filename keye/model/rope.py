"""Rotary position embeddings: 1D (Qwen3), M-RoPE over (t, h, w) (Qwen2-VL / Keye, sections [16,24,24]), 2D for
the ViT (Qwen2-VL VisionRotaryEmbedding), and partial non-interleaved RoPE for the DSA indexer (DeepSeek-V3.2).

All use the rotate-half (non-interleaved) convention of transformers' Qwen models.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inv_freq(dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """dim/2 inverse frequencies theta^(-2i/dim), float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D] (or [..., T, H, D]) with cos/sin [T, D']; D' <= D rotates only the first D' dims."""
    rot = cos.shape[-1]
    cos = cos[..., :, None, :].to(x.dtype)
    sin = sin[..., :, None, :].to(x.dtype)
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def scale_section(section: list[int], half_dim: int) -> list[int]:
    """Rescale an M-RoPE section (e.g. [16,24,24]) to `half_dim` frequency slots, keeping proportions
    (largest-remainder rounding, so the parts always sum to half_dim)."""
    total = sum(section)
    exact = [s * half_dim / total for s in section]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(section)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: half_dim - sum(out)]:
        out[i] += 1
    return out


def mrope_cos_sin(
    position_ids: Tensor, rot_dim: int, theta: float, section: list[int]
) -> tuple[Tensor, Tensor]:
    """cos/sin [T, rot_dim] for 3D positions [3, T]: frequency slot i takes its position from axis t, h or w by
    `section` (sum = rot_dim/2). With equal axes (text) this is exactly 1D RoPE."""
    if sum(section) * 2 != rot_dim:
        raise ValueError(f"section {section} does not cover {rot_dim // 2} slots")
    freqs = inv_freq(rot_dim, theta, position_ids.device)  # [rot/2]
    axis = torch.repeat_interleave(
        torch.arange(3, device=position_ids.device), torch.tensor(section, device=position_ids.device)
    )  # [rot/2]: which axis feeds each slot
    pos = position_ids.float()[axis]  # [rot/2, T]
    angles = (pos * freqs[:, None]).T  # [T, rot/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def vision_rope_cos_sin(grids: list[tuple[int, int]], head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """2D RoPE for packed ViT patches in raster order: half the frequency slots follow the row, half the column."""
    quarter = inv_freq(head_dim // 2, theta)  # head_dim/4 frequencies per axis
    rows, cols = [], []
    for h, w in grids:
        rows.append(torch.arange(h).repeat_interleave(w))
        cols.append(torch.arange(w).repeat(h))
    r = torch.cat(rows).float()[:, None] * quarter[None]
    c = torch.cat(cols).float()[:, None] * quarter[None]
    angles = torch.cat((r, c), dim=-1)  # [N, head_dim/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def mrope_positions(
    input_ids: Tensor, image_token_id: int, merged_grids: list[tuple[int, int]], start: int = 0
) -> Tensor:
    """M-RoPE position ids [3, L] of ONE sample (Qwen2-VL rule; Keye puts a text timestamp before every frame).

    Text tokens: t = h = w = running index. The i-th frame (merged grid gh x gw, raster order) occupying a run of
    image tokens: t = p, h = p + row, w = p + col, where p is the next text index; text resumes at p + max(gh, gw).
    `merged_grids` lists the frames in order of appearance (after the 2x2 merge).
    """
    ids = input_ids.tolist()
    out = torch.empty(3, len(ids), dtype=torch.int64)
    p = start
    i = 0
    frame = 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out[:, i] = p
            p += 1
            i += 1
            continue
        if frame >= len(merged_grids):
            raise ValueError("more image-token runs than frames in merged_grids")
        gh, gw = merged_grids[frame]
        n = gh * gw
        if ids[i : i + n] != [image_token_id] * n:
            raise ValueError(f"frame {frame} needs {n} consecutive image tokens at position {i}")
        out[0, i : i + n] = p
        out[1, i : i + n] = p + torch.arange(gh).repeat_interleave(gw)
        out[2, i : i + n] = p + torch.arange(gw).repeat(gh)
        p += max(gh, gw)
        i += n
        frame += 1
    if frame != len(merged_grids):
        raise ValueError(f"{len(merged_grids)} frames given but {frame} found in the tokens")
    return out
