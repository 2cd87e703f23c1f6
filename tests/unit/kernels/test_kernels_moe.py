"""MoE layer on grouped GEMMs (Triton permutation/SwiGLU/un-permutation) against moe_reference."""

from __future__ import annotations

import torch

from keye.kernels import dispatch
from keye.kernels.moe import moe_experts, moe_layer, permutation, swiglu
from keye.kernels.moe_reference import experts_reference, moe_reference, route


def _params(seed: int, t: int = 11, h: int = 32, f: int = 16, e: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    logits[:, 4] = -30.0  # expert 4 receives no token: an empty group
    wg, wu = torch.randn(e, h, f, generator=g), torch.randn(e, h, f, generator=g)
    wd = torch.randn(e, f, h, generator=g)
    return x, logits, wg, wu, wd


def test_permutation_groups_by_expert() -> None:
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    inv, offs = permutation(idx, 4)
    assert offs.tolist() == [2, 4, 6, 6]
    flat = idx.reshape(-1)
    placed = torch.empty(6, dtype=torch.long)
    placed[inv.reshape(-1).long()] = flat
    assert placed.tolist() == [0, 0, 1, 1, 2, 2]


def test_experts_forward_and_grads_match_reference() -> None:
    x, logits, wg, wu, wd = _params(0)
    idx, wts, _ = route(logits, 2)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    grads = []
    for fn in (moe_experts, experts_reference):
        leaves = [p.clone().requires_grad_() for p in (x, wts, wg, wu, wd)]
        y = fn(leaves[0], idx, *leaves[1:])
        grads.append((y, *torch.autograd.grad(y, leaves, dy)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_moe_layer_matches_reference_layer() -> None:
    x, _, wg, wu, wd = _params(1)
    wr = torch.randn(x.shape[1], wg.shape[0], generator=torch.Generator().manual_seed(5))
    y, aux = moe_layer(x, wr, wg, wu, wd, 2)
    ry, raux = moe_reference(x, x @ wr, wg, wu, wd, 2)
    torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)
    assert torch.equal(aux.expert_counts, raux.expert_counts)
    torch.testing.assert_close(aux.load_balance_loss, raux.load_balance_loss)


def test_swiglu_grad() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = (
        torch.randn(7, 33, generator=g, requires_grad=True),
        torch.randn(7, 33, generator=g, requires_grad=True),
    )
    out = swiglu(a, b)
    ref = torch.nn.functional.silu(a) * b
    torch.testing.assert_close(out, ref)
    dy = torch.randn(7, 33, generator=g)
    for x, y in zip(torch.autograd.grad(out, (a, b), dy), torch.autograd.grad(ref, (a, b), dy), strict=True):
        torch.testing.assert_close(x, y)


def test_dispatch_triton_mode_picks_kernels(monkeypatch) -> None:
    monkeypatch.setenv("KEYE_KERNELS", "triton")
    like = torch.zeros(1)
    for name in ("indexer_topk", "sparse_attention", "indexer_kl", "moe_experts", "dsa_decode"):
        assert dispatch.backend_name(name, like) == "triton"
    monkeypatch.setenv("KEYE_KERNELS", "reference")
    assert dispatch.backend_name("sparse_attention", like) == "reference"
