"""Prompt log-probabilities in vLLM's layout (`prompt_logprobs`): for every prompt token after the first, the
model's log-prob of that token given what precedes it, its rank, and the k most likely tokens. This is what a
MOPD teacher behind `keye serve` (or vLLM) returns when it scores a student's answer sent as part of the prompt.

Entry 0 is None (nothing precedes the first token), as are the positions of frame placeholders (the model does not
predict frames). Log-probs are those of the untempered distribution, as vLLM computes prompt logprobs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def prompt_logprobs(
    model: Any, prompt: Any, top: int, token_text: Callable[[int], str]
) -> list[dict[str, dict[str, Any]] | None]:
    """[None, {str(id): {"logprob", "rank", "decoded_token"}}, ...] for keye.model.generate.Prompt `prompt`: each
    entry holds the prompt's own token and the `top` most likely ones (vLLM: ranks start at 1)."""
    from keye.model.generate import Prompt
    from keye.rl.policy import answer_logprobs

    ids = [int(t) for t in torch.as_tensor(prompt.input_ids).tolist()]
    out: list[dict[str, dict[str, Any]] | None] = [None]
    if len(ids) < 2:
        return out
    head = Prompt(input_ids=ids[:1], pixel_patches=prompt.pixel_patches, patch_grids=prompt.patch_grids)
    with torch.no_grad():
        s = answer_logprobs(model, [head], [ids[1:]], 1.0, with_entropy=False, with_full=True)
    full = s.full[0].float().cpu()  # [n - 1, V]
    image_id = model.config.image_token_id
    tops = full.topk(top, dim=-1) if top > 0 else None
    for j, tid in enumerate(ids[1:]):
        if tid == image_id:
            out.append(None)
            continue
        row = full[j]
        lp = float(row[tid])
        entry = {
            str(tid): {
                "logprob": lp,
                "rank": int((row > row[tid]).sum()) + 1,
                "decoded_token": token_text(tid),
            }
        }
        if tops is not None:
            for r, (v, t) in enumerate(
                zip(tops.values[j].tolist(), tops.indices[j].tolist(), strict=True), 1
            ):
                entry.setdefault(str(t), {"logprob": float(v), "rank": r, "decoded_token": token_text(t)})
        out.append(entry)
    return out
