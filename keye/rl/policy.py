"""The trainer's view of sampled answers: log pi_theta(y_t | prompt, y_<t) for every answer token, in one packed
forward over prompt + answer (frames included), with gradients. Logits are computed only on the rows that
predict answer tokens (`logits_index`), divided by the sampling temperature and with the image placeholder masked,
exactly as keye.model.generate samples, so on-policy ratios start at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from keye.model.rope import mrope_positions
from keye.model.vit import frame_grids


@dataclass
class TokenScores:
    logprobs: Tensor  # [B, L] right-padded, 0 on padding
    entropy: Tensor  # [B, L] (detached) entropy of the tempered distribution
    mask: Tensor  # [B, L] float, 1 on answer tokens
    full: Tensor | None = None  # [B, L, V] log-probs of the whole vocabulary (with_full=True), 0 on padding


def _positions(model: Any, ids: Tensor, grids: Tensor | None) -> Tensor:
    if grids is None:
        return torch.arange(ids.shape[0])[None].expand(3, -1).clone()
    merge = model.config.vision.spatial_merge
    return mrope_positions(
        ids, model.config.image_token_id, [(h // merge, w // merge) for h, w in frame_grids(grids)]
    )


def answer_logprobs(
    model: Any,
    prompts: Sequence[Any],
    answers: Sequence[Sequence[int]],
    temperature: float = 1.0,
    with_entropy: bool = True,
    with_full: bool = False,
) -> TokenScores:
    """Token log-probs of each answer given its prompt (keye.model.generate.Prompt); differentiable in the
    model's parameters. An empty answer gives a row of padding. `with_full` also returns the log-probs of the
    whole vocabulary at every answer position (exact KL between two models that share the tokenizer)."""
    device = model.device
    ids, pos, lens, index, patches, grids = [], [], [], [], [], []
    offset = 0
    for p, ans in zip(prompts, answers, strict=True):
        pid = torch.as_tensor(p.input_ids, dtype=torch.int64).cpu()
        full = torch.cat([pid, torch.as_tensor(list(ans), dtype=torch.int64)])
        ids.append(full)
        pos.append(_positions(model, full, p.patch_grids))
        lens.append(full.shape[0])
        index.append(offset + len(pid) - 1 + torch.arange(len(ans)))
        offset += full.shape[0]
        if p.pixel_patches is not None:
            patches.append(p.pixel_patches)
            grids.append(p.patch_grids)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    flat_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
    b, width = len(answers), max((len(a) for a in answers), default=0)
    logprobs = torch.zeros(b, width, device=device)
    entropy = torch.zeros(b, width, device=device)
    mask = torch.zeros(b, width, device=device)
    if flat_index.numel() == 0:
        return TokenScores(logprobs, entropy, mask)
    out = model(
        input_ids=torch.cat(ids).to(device),
        position_ids=torch.cat(pos, dim=1).to(device),
        cu_seqlens=cu.to(device),
        pixel_patches=torch.cat(patches).to(device, model.dtype) if patches else None,
        patch_grids=torch.cat(grids).to(device) if grids else None,
        logits_index=flat_index.to(device),
    )
    logits = out.logits.float()
    logits[:, model.config.image_token_id] = float("-inf")
    logp_all = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    targets = torch.cat([torch.as_tensor(list(a), dtype=torch.int64) for a in answers]).to(device)
    tok_lp = logp_all.gather(1, targets[:, None])[:, 0]
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all.masked_fill(torch.isinf(logp_all), 0.0)).sum(-1)
    rows = torch.cat([torch.full((len(a),), i, dtype=torch.int64) for i, a in enumerate(answers)]).to(device)
    cols = torch.cat([torch.arange(len(a)) for a in answers]).to(device)
    logprobs = logprobs.index_put((rows, cols), tok_lp)
    if ent is not None:
        entropy = entropy.index_put((rows, cols), ent)
    mask[rows, cols] = 1.0
    full = None
    if with_full:
        full = torch.zeros(b, width, logp_all.shape[-1], device=device)
        full = full.index_put((rows, cols), logp_all.masked_fill(torch.isinf(logp_all), -1e4))
    return TokenScores(logprobs, entropy, mask, full)
