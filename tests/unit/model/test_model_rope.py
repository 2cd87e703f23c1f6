"""Positions and token layout: M-RoPE, 2D ViT RoPE, merge order, token counts, checkpointed training."""

from __future__ import annotations

import torch

from keye.model import build_model
from keye.model.config import preset
from keye.model.patches import patchify
from keye.model.projector import Projector, merge_order
from keye.model.rope import (
    apply_rope,
    inv_freq,
    mrope_cos_sin,
    mrope_positions,
    scale_section,
    vision_rope_cos_sin,
)
from keye.model.vision_tokens import frame_tokens


def test_mrope_on_text_is_plain_rope():
    pos = torch.arange(11)
    cos, sin = mrope_cos_sin(pos[None].expand(3, -1), 32, 10000.0, [4, 6, 6])
    ang = pos[:, None].float() * inv_freq(32, 10000.0)[None]
    emb = torch.cat([ang, ang], -1)
    assert torch.allclose(cos, emb.cos()) and torch.allclose(sin, emb.sin())


def test_mrope_sections_take_their_axis():
    pos = torch.stack([torch.zeros(5), torch.arange(5), torch.zeros(5)]).long()  # only h varies
    cos, _ = mrope_cos_sin(pos, 16, 100.0, [2, 3, 3])
    assert torch.all(cos[:, :2] == 1) and torch.all(cos[:, 5:8] == 1)  # t and w slots see position 0
    assert not torch.all(cos[1:, 2:5] == 1)


def test_mrope_positions_of_a_frame():
    img = 9
    ids = torch.tensor([1, 2] + [img] * 6 + [3, 4])
    pos = mrope_positions(ids, img, [(2, 3)])
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert pos[:, 8:].tolist() == [[5, 6]] * 3  # text resumes at p + max(gh, gw)


def test_scale_section_sums():
    for half in (3, 4, 8, 16, 64):
        assert sum(scale_section([16, 24, 24], half)) == half
    assert scale_section([16, 24, 24], 64) == [16, 24, 24]


def test_vision_rope_is_relative_in_2d():
    g = torch.Generator().manual_seed(0)
    cos, sin = vision_rope_cos_sin([(4, 5)], 16, 10000.0)
    q = torch.randn(1, 1, 16, generator=g).expand(20, 1, 16)
    k = torch.randn(1, 1, 16, generator=g).expand(20, 1, 16)
    qr, kr = apply_rope(q, cos, sin)[:, 0], apply_rope(k, cos, sin)[:, 0]
    at = lambda r, c: r * 5 + c
    # same (dr, dc) offset -> same score, wherever the pair sits in the grid
    s1 = qr[at(1, 1)] @ kr[at(0, 3)]
    s2 = qr[at(3, 2)] @ kr[at(2, 4)]
    s3 = qr[at(3, 2)] @ kr[at(2, 3)]
    assert torch.allclose(s1, s2, atol=1e-5) and not torch.allclose(s1, s3, atol=1e-3)


def test_merge_order_and_token_count_agree_with_vision_tokens():
    assert merge_order([(4, 4)])[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    proj = Projector(8, 12)
    for h, w in ((56, 84), (28, 28), (112, 56)):
        patches, grids = patchify(torch.randn(2, 3, h, w))
        feats = torch.randn(patches.shape[0], 8)
        out = proj(feats, [(h // 14, w // 14)] * 2)
        assert out.shape == (2 * frame_tokens(h, w), 12)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = preset("tiny", vocab_size=50, image_token_id=49)
    cfg.lm.dsa.topk, cfg.lm.dsa.block = 4, 8
    cfg.set_attention_mode("dsa")
    ids = torch.randint(0, 49, (30,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    grads = []
    for ckpt in (False, True):
        model = build_model(cfg, seed=0).train()
        model.set_gradient_checkpointing(ckpt)
        model(input_ids=ids, cu_seqlens=cu, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
