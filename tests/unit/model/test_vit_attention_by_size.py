"""The ViT's batched attention over frames of mixed sizes == one SDPA call per frame, values and gradients bit for
bit (the per-frame loop it replaced), and frames never see each other."""

import torch

from keye.model.vit import _attention_by_size, _attention_per_frame


def test_mixed_sizes_match_per_frame_calls_exactly():
    g = torch.Generator().manual_seed(3)
    lengths = [12, 20, 12, 7, 20, 20, 1, 12]  # interleaved sizes, a one-patch frame
    n, h, hd = sum(lengths), 3, 8
    base = [torch.randn(n, h, hd, generator=g) for _ in range(3)]
    w = torch.randn(n, h * hd, generator=g)
    got = []
    for fn in (_attention_per_frame, _attention_by_size):
        q, k, v = (x.clone().requires_grad_() for x in base)
        o = fn(q, k, v, lengths)
        (o * w).sum().backward()
        got.append((o.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)


def test_frames_do_not_attend_across():
    g = torch.Generator().manual_seed(4)
    lengths = [5, 9, 5]
    q, k, v = (torch.randn(19, 2, 4, generator=g) for _ in range(3))
    before = _attention_by_size(q, k, v, lengths)
    v2 = v.clone()
    v2[5:14] += 10.0  # change only the middle frame's values
    after = _attention_by_size(q, k, v2, lengths)
    torch.testing.assert_close(before[:5], after[:5], rtol=0, atol=0)
    torch.testing.assert_close(before[14:], after[14:], rtol=0, atol=0)
    assert not torch.allclose(before[5:14], after[5:14])
