"""keye.model.shared_prefix: samples packed as [prefix | rest_1 | ... ] give the logits, loss and gradients of the
same samples packed whole (random weights and ids, odd lengths, frames in a rest), and the layout is refused or
skipped where it would not be exact."""

from __future__ import annotations

import pytest
import torch
from test_model import IMG, VOCAB, _close, _tiny, _vl_sample

from keye.model.shared_prefix import MIN_PREFIX, share_prefix, sharing_prefix


def _samples(prefix_len: int = 41, rests=(7, 13, 1, 22), seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, IMG, (prefix_len,), generator=g)
    ids = [torch.cat([prefix, torch.randint(0, IMG, (n,), generator=g)]) for n in rests]
    pos = [torch.arange(len(x))[None].expand(3, -1) for x in ids]
    labels = []
    for x in ids:
        lab = torch.where(torch.rand(len(x), generator=g) < 0.6, x, torch.full_like(x, -100))
        lab[: prefix_len + 1] = -100
        labels.append(lab)
    return ids, pos, labels


def _whole(model, ids, pos, labels, **extra):
    cu = torch.tensor([0, *torch.tensor([len(x) for x in ids]).cumsum(0).tolist()], dtype=torch.int32)
    return model(
        input_ids=torch.cat(ids), position_ids=torch.cat(pos, 1), cu_seqlens=cu, labels=torch.cat(labels),
        return_logits=True, **extra,
    )  # fmt: skip


def _shared(model, batch, **extra):
    with sharing_prefix(model, batch.layout):
        return model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.layout.cu_seqlens,
            labels=batch.labels, return_logits=True, **extra,
        )  # fmt: skip


def test_shared_prefix_gives_the_loss_logits_and_gradients_of_whole_samples():
    model = _tiny("dense").train()
    ids, pos, labels = _samples()
    batch = share_prefix(ids, pos, labels, IMG)
    assert batch is not None and batch.layout.prefix_len == 41
    assert len(batch.input_ids) == 41 + 7 + 13 + 1 + 22 and batch.rows_unshared == 4 * 41 + 43

    whole = _whole(model, ids, pos, labels)
    grads_whole = torch.autograd.grad(whole.lm_loss, list(model.parameters()), allow_unused=True)
    shared = _shared(model, batch)
    grads_shared = torch.autograd.grad(shared.lm_loss, list(model.parameters()), allow_unused=True)

    assert whole.num_tokens == shared.num_tokens > 0
    assert abs(whole.lm_loss.item() - shared.lm_loss.item()) < 1e-5
    # every rest row's logits equal the whole sample's (the prefix rows once)
    starts = torch.tensor([0, *torch.tensor([len(x) for x in ids]).cumsum(0).tolist()])
    p = 41
    assert _close(shared.logits[:p], whole.logits[:p])
    cu = batch.layout.cu_seqlens.tolist()
    for b in range(len(ids)):
        assert _close(shared.logits[cu[b + 1] : cu[b + 2]], whole.logits[starts[b] + p : starts[b + 1]])
    checked = 0
    for gw, gs in zip(grads_whole, grads_shared, strict=True):
        if gw is None:
            assert gs is None
            continue
        assert (gw - gs).abs().max().item() <= 1e-5 * max(1.0, gw.abs().max().item()), "gradient differs"
        checked += int(gw.abs().sum() > 0)
    assert checked > 10  # the gradients reach the attention, experts and embeddings


def test_frames_in_the_rest_reach_the_same_logits():
    model = _tiny("dense")
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(0, IMG, (20,), generator=g)
    vl_ids, patches, grids, vl_pos = _vl_sample(3, 2, 56, 84, 4)
    ids = [torch.cat([prefix, vl_ids]), torch.cat([prefix, torch.randint(0, IMG, (5,), generator=g)])]
    pos = [
        torch.cat([torch.arange(20)[None].expand(3, -1), vl_pos + 20], 1),
        torch.arange(25)[None].expand(3, -1),
    ]
    labels = [torch.where(x == IMG, -100, x) for x in ids]
    for lab in labels:
        lab[:21] = -100
    batch = share_prefix(ids, pos, labels, IMG)
    assert batch is not None and batch.layout.prefix_len == 20
    extra = {"pixel_patches": patches, "patch_grids": grids}
    with torch.no_grad():
        whole, shared = _whole(model, ids, pos, labels, **extra), _shared(model, batch, **extra)
    assert abs(whole.lm_loss.item() - shared.lm_loss.item()) < 1e-5
    cu = batch.layout.cu_seqlens.tolist()
    assert _close(shared.logits[cu[1] : cu[2]], whole.logits[20 : len(ids[0])])
    assert _close(shared.logits[cu[2] :], whole.logits[len(ids[0]) + 20 :])


def test_the_prefix_stops_before_a_label_an_image_or_a_difference():
    ids, pos, labels = _samples(prefix_len=40)
    labels[2][30] = 7  # a trained token inside the common prefix: the prefix ends two rows before it
    assert share_prefix(ids, pos, labels, IMG).layout.prefix_len == 29
    ids2, pos2, labels2 = _samples(prefix_len=40)
    ids2[1][25] = IMG  # (one sample: the common prefix already ends there)
    assert share_prefix(ids2, pos2, labels2, IMG).layout.prefix_len == 25
    short, spos, slab = _samples(prefix_len=MIN_PREFIX - 1)
    assert share_prefix(short, spos, slab, IMG) is None
    assert share_prefix(ids[:1], pos[:1], labels[:1], IMG) is None
    assert VOCAB > IMG


def test_a_sparse_model_refuses_the_layout():
    ids, pos, labels = _samples()
    batch = share_prefix(ids, pos, labels, IMG)
    with pytest.raises(NotImplementedError, match="dense attention"):
        with sharing_prefix(_tiny("dsa", topk=4), batch.layout):
            pass


def test_generation_with_a_shared_prefill_matches_the_plain_one(monkeypatch):
    """generate(share_prefix=True): prompts opening with the same tokens prefill them once into every cache row;
    greedy tokens and their log-probs equal the plain prefill's (a repeated prompt object and frames included)."""
    from keye.model.generate import Prompt, generate

    model = _tiny("dense")
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, IMG, (33,), generator=g)
    vl_ids, patches, grids, _ = _vl_sample(2, 1, 28, 56, 3, seed=8)
    texts = [torch.cat([prefix, torch.randint(0, IMG, (n,), generator=g)]) for n in (1, 9, 4)]
    framed = Prompt(input_ids=torch.cat([prefix, vl_ids]), pixel_patches=patches, patch_grids=grids)
    same = Prompt(input_ids=texts[1])
    prompts = [Prompt(input_ids=texts[0]), same, framed, same, Prompt(input_ids=texts[2])]
    import keye.model.shared_prefix as sp

    calls, real = [], sp.prefix_attention
    monkeypatch.setattr(sp, "prefix_attention", lambda *a: calls.append(a[3].prefix_len) or real(*a))
    plain = generate(model, prompts, max_new_tokens=6)
    assert not calls
    shared = generate(model, prompts, max_new_tokens=6, share_prefix=True)
    assert calls == [33] * model.config.lm.num_layers  # one shared prefill, every layer
    for a, b in zip(plain, shared, strict=True):
        assert a.token_ids == b.token_ids and a.prompt_len == b.prompt_len
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
