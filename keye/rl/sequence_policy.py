"""The trainer's view of a multi-turn trajectory: log pi_theta of exactly the tokens the policy sampled, in one
packed forward over the whole sequence (prompt, model turns, tool turns with their frames).

Why not keye.rl.policy.answer_logprobs: there the answer is one contiguous run after the prompt; an agent's
response interleaves model turns with tool outputs (text and frames) that the model did not write. Here a response
is every token after the prompt plus a mask of the sampled ones: logits are computed only on the rows predicting
masked-in tokens (the same tempering and image-token masking as keye.model.generate, so on-policy ratios start at
1), and the result is laid out over the whole response so that keye.rl.losses.policy_loss takes the mask as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from keye.rl.policy import TokenScores, _positions


def response_logprobs(
    model: Any,
    prompts: Sequence[Any],
    responses: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]],
    pixel_patches: Sequence[torch.Tensor | None],
    patch_grids: Sequence[torch.Tensor | None],
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> TokenScores:
    """Token log-probs [B, L] over each response (right-padded), non-zero only where `masks` is true; `pixel_patches`
    / `patch_grids` are those of the whole sequence (prompt frames then tool frames, in order)."""
    device = model.device
    ids, pos, lens, index, patches, grids, rows, cols, targets = [], [], [], [], [], [], [], [], []
    offset = 0
    for b, (p, resp, m) in enumerate(zip(prompts, responses, masks, strict=True)):
        if len(resp) != len(m):
            raise ValueError(f"response {b}: {len(resp)} tokens but a mask of {len(m)}")
        pid = torch.as_tensor(p.input_ids, dtype=torch.int64).cpu()
        full = torch.cat([pid, torch.as_tensor(list(resp), dtype=torch.int64)])
        g = patch_grids[b]
        ids.append(full)
        pos.append(_positions(model, full, g))
        lens.append(full.shape[0])
        where = torch.nonzero(torch.as_tensor(list(m), dtype=torch.bool), as_tuple=False).flatten()
        index.append(offset + len(pid) - 1 + where)
        rows.append(torch.full((len(where),), b, dtype=torch.int64))
        cols.append(where)
        targets.append(full[len(pid) + where])
        offset += full.shape[0]
        if pixel_patches[b] is not None:
            patches.append(pixel_patches[b])
            grids.append(g)
    width = max((len(r) for r in responses), default=0)
    logprobs = torch.zeros(len(responses), width, device=device)
    entropy = torch.zeros(len(responses), width, device=device)
    mask = torch.zeros(len(responses), width, device=device)
    flat_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
    if flat_index.numel() == 0:
        return TokenScores(logprobs, entropy, mask)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
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
    tok_lp = logp_all.gather(1, torch.cat(targets).to(device)[:, None])[:, 0]
    r, c = torch.cat(rows).to(device), torch.cat(cols).to(device)
    logprobs = logprobs.index_put((r, c), tok_lp)
    if with_entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all.masked_fill(torch.isinf(logp_all), 0.0)).sum(-1)
        entropy = entropy.index_put((r, c), ent)
    mask[r, c] = 1.0
    return TokenScores(logprobs, entropy, mask)
