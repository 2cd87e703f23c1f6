"""Training samples that open with the same tokens, packed as [prefix | rest_1 | ... | rest_B]: the shared prefix is
computed once and every sample's rest attends to it.

Why: the agent warm-up's demonstrations all open with the same system prompt and tool block (~1160 of ~1470 tokens
on the default run's BPE), so B of them cost P + sum(L_b) rows instead of B * P + sum(L_b). It is exact: causal
attention never lets a prefix row see what follows it, so the prefix's hidden states are those of every sample,
each rest row sees the same keys as unshared, and the gradient from every sample reaches the one prefix through
autograd. Only the MoE router's balance term counts the prefix once instead of B times (its coefficient is 1e-3).

Dense attention layers only (a DSA layer selects top-k keys per sample; with a shared prefix it would need the
indexer over two spans): callers check `dense_only` and pack whole samples otherwise; `sharing_prefix` refuses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keye.kernels.dense_sdpa import dense_attention_sdpa, suffix_causal_sdpa

MIN_PREFIX = 16  # below this, sharing saves less than the per-sample attention calls cost


@dataclass
class PrefixLayout:
    """The packed rows [prefix | rest_1 | ... | rest_B]: prefix_len rows, then `cu_seqlens` (int32 [B+2]: 0,
    prefix_len, prefix_len + L_1, ...) marks each segment as a sample of the pack."""

    prefix_len: int
    cu_seqlens: Tensor


@dataclass
class SharedBatch:
    """A packed batch in the shared layout: what the model's forward takes."""

    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor
    layout: PrefixLayout
    samples: int
    rows_unshared: int


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PrefixLayout, scale: float) -> Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] in the shared layout -> out [T, Hq, D]: the prefix causally over itself, each
    rest over the prefix's keys and its own earlier ones."""
    p = layout.prefix_len
    head = dense_attention_sdpa(q[:p], k[:p], v[:p], layout.cu_seqlens[:2], scale)[0]
    bounds = layout.cu_seqlens.tolist()
    outs = [head]
    for s, e in zip(bounds[1:-1], bounds[2:], strict=True):
        keys = torch.cat([k[:p], k[s:e]])
        values = torch.cat([v[:p], v[s:e]])
        outs.append(suffix_causal_sdpa(q[s:e], keys, values, scale))
    return torch.cat(outs)


def dense_only(model: nn.Module) -> bool:
    cfg = model.config.lm
    return all(cfg.mode_of(i) == "dense" for i in range(cfg.num_layers))


@contextmanager
def sharing_prefix(model: nn.Module, layout: PrefixLayout) -> Iterator[None]:
    """Every attention layer of `model` computes in `layout` for the forward (and backward) inside the block."""
    if not dense_only(model):
        raise NotImplementedError(
            "a shared prefix needs dense attention in every layer (keye.model.shared_prefix)"
        )
    layers = [layer.self_attn for layer in model.lm.layers]
    for attn in layers:
        attn.shared_prefix = layout
    try:
        yield
    finally:
        for attn in layers:
            attn.shared_prefix = None


def share_prefix(
    ids: Sequence[Tensor], positions: Sequence[Tensor], labels: Sequence[Tensor], image_token_id: int
) -> SharedBatch | None:
    """The samples in the shared layout, or None where nothing worth sharing: their longest common prefix of ids
    with equal positions, no image token in it, and no label on it or on the token right after it (the prefix's last
    row predicts each sample's next token, a prediction the shared layout does not make)."""
    if len(ids) < 2:
        return None
    n = min(len(x) for x in ids) - 1
    first = ids[0][:n]
    for x in ids[1:]:
        differs = (x[:n] != first).nonzero()
        n = int(differs[0]) if len(differs) else n
        first = first[:n]
    images = (first == image_token_id).nonzero()
    n = int(images[0]) if len(images) else n
    for pos, lab in zip(positions, labels, strict=True):
        if not torch.equal(pos[:, :n], positions[0][:, :n]):
            return None
        labelled = (lab[: n + 1] != -100).nonzero()
        n = min(n, int(labelled[0]) - 1) if len(labelled) else n
    if n < MIN_PREFIX:
        return None
    rest = [len(x) - n for x in ids]
    cu = torch.tensor([0, n, *(n + torch.tensor(rest).cumsum(0)).tolist()], dtype=torch.int32)
    return SharedBatch(
        input_ids=torch.cat([ids[0][:n], *(x[n:] for x in ids)]),
        position_ids=torch.cat([positions[0][:, :n], *(p[:, n:] for p in positions)], dim=1),
        labels=torch.cat([torch.full((n,), -100, dtype=labels[0].dtype), *(lab[n:] for lab in labels)]),
        layout=PrefixLayout(n, cu),
        samples=len(ids),
        rows_unshared=sum(len(x) for x in ids),
    )
