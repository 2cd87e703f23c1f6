"""SDPA dense attention == the chunked reference on random packed GQA inputs with odd lengths."""

import torch

from keye.kernels import dispatch
from keye.kernels.dense_sdpa import dense_attention_sdpa, dense_attention_sdpa_per_sample
from keye.kernels.dsa_reference import dense_attention_reference


def test_sdpa_matches_reference_packed_odd_lengths():
    g = torch.Generator().manual_seed(0)
    lens = [7, 1, 33, 18]
    t, hq, hkv, d = sum(lens), 6, 2, 16
    q, k, v = (torch.randn(t, h, d, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o, _ = dense_attention_sdpa(q, k, v, cu, 0.3)
    ref, _ = dense_attention_reference(q, k, v, cu, 0.3, block=8)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    (go,) = torch.autograd.grad(o.square().sum(), q)
    (gr,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(go, gr, rtol=1e-4, atol=1e-5)


def test_dispatch_uses_sdpa_unless_reference_is_forced(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("KEYE_KERNELS", "auto")
    assert dispatch.backend_name("dense_attention", x) == "torch-sdpa"
    monkeypatch.setenv("KEYE_KERNELS", "reference")
    assert dispatch.backend_name("dense_attention", x) == "reference"


def test_sdpa_gradients_equal_per_sample_slicing_bit_for_bit():
    """The split/cat form against the per-sample slicing it replaced (empty and one-token samples included)."""
    g = torch.Generator().manual_seed(1)
    lens = [9, 0, 1, 40, 23]
    t = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    base = [torch.randn(t, h, 8, generator=g) for h in (4, 2, 2)]
    w = torch.randn(t, 4, 8, generator=g)
    got = []
    for fn in (dense_attention_sdpa_per_sample, dense_attention_sdpa):
        q, k, v = (x.clone().requires_grad_() for x in base)
        o, _ = fn(q, k, v, cu, 0.25)
        (o * w).sum().backward()
        got.append((o.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)
