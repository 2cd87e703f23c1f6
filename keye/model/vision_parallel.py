"""ViT and LM placed apart (Keye-VL-2.0's heterogeneous placement): the vision encoder runs data-parallel over all
ranks on the frames of the whole global batch, balanced by patch count, whatever rank's LM batch they belong to;
the projected visual tokens are then sent back to the rank whose LM sequence holds their placeholders. A rank
whose pack carries a long video no longer encodes all of its frames while the other ranks' LMs wait.

Frames are dealt in their global order (rank 0's frames, then rank 1's, ...) as contiguous runs of about equal
patch counts, so every exchange is one all-to-all of contiguous row ranges: pixel patches out (no gradient), visual
tokens back (autograd: their gradients return to the rank that encoded them, and each rank's ViT gradient is
that of the frames it encoded; summed over ranks it is the single-process gradient). Frames are independent in
the ViT and the projector (attention and centring stay inside a frame), so the split changes no value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from keye.model.expert_parallel import all_to_all
from keye.model.vit import frame_grids


def deal_frames(patches_per_frame: list[int], world: int) -> list[int]:
    """Encoder rank of each frame (global order): contiguous runs with about equal patch totals."""
    total = sum(patches_per_frame)
    owner, acc = [], 0
    for n in patches_per_frame:
        owner.append(min(world - 1, (2 * acc + n) * world // (2 * max(1, total))))  # by the frame's midpoint
        acc += n
    return owner


def _splits(counts: list[int], owners: list[int], world: int) -> list[int]:
    out = [0] * world
    for c, o in zip(counts, owners, strict=True):
        out[o] += c
    return out


def encode_apart(
    model: nn.Module,
    pixel_patches: Tensor,
    patch_grids: Tensor,
    group=None,  # noqa: ANN001
) -> Tensor:
    """Visual tokens [N, H_lm] of this rank's frames (in order), encoded on whichever ranks were dealt them."""
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    merge = model.config.vision.spatial_merge
    mine = frame_grids(patch_grids)
    every: list[list[tuple[int, int]]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(every, mine, group=group)
    flat = [(r, hw) for r in range(world) for hw in every[r]]
    owners = deal_frames([h * w for _, (h, w) in flat], world)
    tok = [(h // merge) * (w // merge) for _, (h, w) in flat]
    pat = [h * w for _, (h, w) in flat]
    src = [r for r, _ in flat]

    def split(values: list[int], keep_src: int | None, keep_owner: int | None) -> list[int]:
        sel = [
            (v, o if keep_src is not None else s)
            for v, s, o in zip(values, src, owners, strict=True)
            if (keep_src is None or s == keep_src) and (keep_owner is None or o == keep_owner)
        ]
        return _splits([v for v, _ in sel], [k for _, k in sel], world)

    send_p, recv_p = split(pat, rank, None), split(pat, None, rank)
    patches = pixel_patches.new_empty((sum(recv_p), pixel_patches.shape[1]))
    dist.all_to_all_single(patches, pixel_patches.contiguous(), recv_p, send_p, group=group)
    grids = [hw for (_, hw), o in zip(flat, owners, strict=True) if o == rank]
    if grids:
        rows = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.int64, device=pixel_patches.device)
        feats = model.vision(patches, rows)
        visual = model.projector(feats, grids)
    else:  # nothing dealt to this rank: still a graph node (through the ViT: FSDP units) so the backward runs
        hidden = model.config.lm.hidden_size
        visual = patches.new_zeros((0, hidden)) + model.vision_keepalive(patches)
    send_t, recv_t = split(tok, None, rank), split(tok, rank, None)
    return all_to_all(visual, recv_t, send_t, group)


def place_visual(
    model: nn.Module, x: Tensor, input_ids: Tensor, pixel_patches: Tensor | None, patch_grids: Tensor | None
) -> Tensor:
    """Token embeddings x [T, H] with the visual tokens of this rank's frames (encoded apart over
    model.vision_group) in the placeholder rows. Every rank of the group must call it, with or without frames."""
    if pixel_patches is None:
        dim = model.config.vision.in_channels * model.config.vision.patch_size**2
        pixel_patches = x.new_zeros((0, dim), dtype=torch.float32)
        patch_grids = torch.zeros((0, 3), dtype=torch.int64, device=x.device)
    visual = encode_apart(model, pixel_patches, patch_grids, model.vision_group).to(x.dtype)
    mask = input_ids == model.config.image_token_id
    if int(mask.sum()) != visual.shape[0]:
        raise ValueError(f"{int(mask.sum())} image placeholder tokens but the frames give {visual.shape[0]}")
    return x.masked_scatter(mask[:, None], visual)


def embed_apart(
    model: nn.Module, input_ids: Tensor, pixel_patches: Tensor, patch_grids: Tensor, group=None
) -> Tensor:  # noqa: ANN001
    """KeyeVL.embed with the ViT spread over the group: token embeddings [T, H] with the visual tokens in place."""
    x = model.lm.embed_tokens(input_ids)
    visual = encode_apart(model, pixel_patches, patch_grids, group).to(x.dtype)
    mask = input_ids == model.config.image_token_id
    if int(mask.sum()) != visual.shape[0]:
        raise ValueError(f"{int(mask.sum())} image placeholder tokens but the frames give {visual.shape[0]}")
    return x.masked_scatter(mask[:, None], visual)
