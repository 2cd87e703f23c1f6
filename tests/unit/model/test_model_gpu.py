"""keye.model on CUDA (reference kernels): same numbers as on CPU, bf16 training step, generation, DSA memory."""

from __future__ import annotations

import os
import time

import pytest
import torch

from keye.kernels.dsa_reference import (
    indexer_kl_reference,
    indexer_topk_reference,
    sparse_attention_reference,
)
from keye.model import build_model
from keye.model.config import preset
from keye.model.generate import generate

pytestmark = pytest.mark.gpu


def _tiny(mode: str, topk: int = 4):
    cfg = preset("tiny", vocab_size=97, image_token_id=96)
    cfg.lm.dsa.topk, cfg.lm.dsa.block = topk, 8
    cfg.set_attention_mode(mode)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("KEYE_KERNELS", "reference")
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("mode", ["dense", "dsa"])
def test_cuda_matches_cpu(mode):
    model = _tiny(mode)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (40,), generator=g)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    with torch.no_grad():
        cpu = model(input_ids=ids, cu_seqlens=cu).logits
        gpu = model.cuda()(input_ids=ids.cuda(), cu_seqlens=cu.cuda()).logits.cpu()
    assert (cpu - gpu).abs().max().item() < 1e-4 * max(1.0, cpu.abs().max().item())


def test_cuda_bf16_training_step_and_generation():
    model = _tiny("dsa").cuda().to(torch.bfloat16).train()
    ids = torch.randint(0, 96, (64,), device="cuda")
    cu = torch.tensor([0, 30, 64], dtype=torch.int32, device="cuda")
    out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.indexer_loss is not None
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    res = generate(model, [[1, 2, 3, 4, 5, 6], [7, 8]], max_new_tokens=8)
    assert all(len(r.token_ids) == 8 for r in res)


def test_reference_dsa_memory_on_gpu_at_32k():
    """30B-A3B attention shape (32/4 heads x 128, indexer 16 x 64, top-2048) at 32K tokens, reference path."""
    t, hq, hkv, d, hi, di, k = 32768, 32, 4, 128, 16, 64, 2048
    dev = "cuda"
    q = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(t, hi, di, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(t, di, device=dev, dtype=torch.bfloat16)
    w = torch.randn(t, hi, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    idx, _ = indexer_topk_reference(qi, ki, w, cu, k)
    torch.cuda.synchronize()
    t1 = time.time()
    o, _ = sparse_attention_reference(q, kk, v, idx, d**-0.5)
    torch.cuda.synchronize()
    t2 = time.time()
    loss = indexer_kl_reference(q, kk, cu, d**-0.5, qi, ki, w, idx)
    torch.cuda.synchronize()
    t3 = time.time()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    msg = (
        f"reference DSA @32K on {torch.cuda.get_device_name()}: peak extra {peak:.2f} GiB; "
        f"indexer_topk {t1 - t0:.2f} s, sparse_attention {t2 - t1:.2f} s, indexer_kl {t3 - t2:.2f} s"
    )
    print(msg)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "dsa_reference_gpu.txt"), "a") as f:
            f.write(msg + "\n")
    assert torch.isfinite(o.float()).all() and torch.isfinite(loss)
    assert peak < 8  # one L x L float32 score matrix alone would be 4 GiB per head
