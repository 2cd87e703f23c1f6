"""The tiny model with dsa.indexer_dtype=fp8: token selection scores e4m3 queries/keys (per-token scales), the KV
cache keeps the indexer keys as e4m3 rows + float32 scales, decode selects over them. On CPU the reference path
quantises and dequantises, so selections equal the reference top-k on the dequantised values; the Triton path
(interpreter, e4m3 values held in float32) selects the same rows; generation equals the full forward; it trains."""

from __future__ import annotations

import json

import pytest
import torch

from keye.kernels import dispatch
from keye.kernels.dsa_reference import dsa_decode_reference, indexer_topk_reference
from keye.kernels.indexer_fp8 import FP8, dequantize, fake_quantize
from keye.model import build_model, preset
from keye.model.cache import KVCache
from keye.model.config import DSAConfig, ModelConfig

VOCAB = 97
IMG = 96


def _tiny(
    indexer_dtype: str = "fp8", topk: int = 5, layers: int = 1, seed: int = 0, index_dim: int = 16
) -> torch.nn.Module:
    cfg = preset("tiny", vocab_size=VOCAB, image_token_id=IMG)
    cfg.lm.num_layers = layers
    cfg.lm.dsa.index_dim = index_dim
    cfg.lm.dsa.topk = topk
    cfg.lm.dsa.block = 8
    cfg.lm.dsa.indexer_dtype = indexer_dtype
    cfg.set_attention_mode("dsa")
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def _capture_indexer(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q_idx, k_idx, w) of layer 0's indexer at every call."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    model.lm.layers[0].self_attn.indexer.register_forward_hook(
        lambda _m, _a, out: seen.append(tuple(t.detach() for t in out))
    )
    return seen


def test_indexer_dtype_validates_roundtrips_and_old_configs_load(tmp_path) -> None:
    with pytest.raises(ValueError, match="dsa.indexer_dtype"):
        DSAConfig(indexer_dtype="fp16")
    cfg = preset("tiny")
    cfg.lm.dsa.indexer_dtype = "fp8"
    cfg.to_json(tmp_path / "config.json")
    back = ModelConfig.from_json(tmp_path / "config.json")
    assert back.lm.dsa.indexer_dtype == "fp8" and back.lm.dsa.fp8_indexer
    old = json.loads(cfg.to_json())
    del old["lm"]["dsa"]["indexer_dtype"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old).lm.dsa.indexer_dtype == "bf16"
    cfg.lm.dsa.indexer_dtype = "int4"  # set after construction: caught by validate()
    with pytest.raises(ValueError, match="dsa.indexer_dtype"):
        cfg.validate()
    cfg.lm.dsa.indexer_dtype, cfg.lm.dsa.selection = "fp8", "block"
    assert not cfg.lm.dsa.fp8_indexer  # block selection stays in the model dtype


def test_cache_holds_one_byte_per_indexer_dim_and_a_scale_per_row() -> None:
    model = _tiny()
    lm = model.config.lm
    cache = KVCache.allocate(lm, 3, 40, torch.float32, "cpu")
    idx, scale = cache.idx_k[0], cache.idx_scale[0]
    assert idx.dtype == FP8 and idx.element_size() == 1 and idx.shape == (3, 40, lm.dsa.index_dim)
    assert scale.dtype == torch.float32 and scale.shape == (3, 40)
    bytes_per_row = idx[0, 0].nbytes + scale[0, 0].nbytes
    assert bytes_per_row == lm.dsa.index_dim + 4
    bf = KVCache.allocate(_tiny("bf16").config.lm, 3, 40, torch.bfloat16, "cpu")
    assert not bf.idx_scale and bf.idx_k[0].dtype == torch.bfloat16
    # prefill + one decode row: the stored rows dequantise to the indexer keys (e4m3: 3 mantissa bits)
    g = torch.Generator().manual_seed(0)
    k_idx = torch.randn(11, lm.dsa.index_dim, generator=g)
    kv = torch.zeros(11, lm.num_kv_heads, lm.head_dim)
    cache.write_prefill(0, kv, kv, k_idx, torch.tensor([0, 4, 11], dtype=torch.int32))
    cache.set_lengths(torch.tensor([4, 7, 0]))
    new = torch.randn(3, lm.dsa.index_dim, generator=g)
    cache.write_decode(0, kv[:3], kv[:3], new)
    deq = dequantize(cache.idx_k[0], cache.idx_scale[0])
    torch.testing.assert_close(deq[0, :4], fake_quantize(k_idx[:4]))
    torch.testing.assert_close(deq[1, :7], fake_quantize(k_idx[4:]))
    torch.testing.assert_close(deq[:, [4, 7, 0]].diagonal().T, fake_quantize(new))
    assert float(((deq[0, :4] - k_idx[:4]).abs() / k_idx[:4].abs().amax(-1, keepdim=True)).max()) <= 2**-4
    two = cache.take_rows(torch.tensor([1, 1]))
    assert two.idx_k[0].dtype == FP8 and torch.equal(two.idx_scale[0], cache.idx_scale[0][[1, 1]])


def test_prefill_selection_is_the_reference_topk_on_dequantised_values_and_triton_agrees(monkeypatch) -> None:
    model = _tiny(topk=5)
    seen = _capture_indexer(model)
    got: list[torch.Tensor] = []
    real = dispatch.indexer_topk_fp8
    monkeypatch.setattr(dispatch, "indexer_topk_fp8", lambda *a: got.append(real(*a)[0]) or real(*a))
    monkeypatch.setattr(dispatch, "indexer_topk", lambda *a: pytest.fail("bf16 top-k in an fp8 model"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, IMG, (37,), generator=g)
    cu = torch.tensor([0, 20, 21, 37], dtype=torch.int32)
    with torch.no_grad():
        model(input_ids=ids, cu_seqlens=cu)
    (q, k, w), (indices,) = seen[0], got
    want, _ = indexer_topk_reference(fake_quantize(q), fake_quantize(k), w, cu, 5)
    assert torch.equal(indices, want)
    tri = dispatch._triton_table()["indexer_topk_fp8"]  # Triton interpreter, e4m3 values in float32
    tri_idx, _ = tri(q, k, w, cu, 5, 8, cap=32, sample_max=16)
    assert torch.equal(tri_idx, want)


@pytest.mark.parametrize("prompt_len", [9, 14])
def test_generation_with_the_fp8_cache_equals_the_full_forward(prompt_len: int, monkeypatch) -> None:
    """One layer: K/V do not depend on any selection, so each decode step (FP8 cache, its query quantised the same
    way) must give the full forward's log-probs at its last row (FP8 top-k over the same dequantised keys)."""
    from keye.model.generate import generate

    model = _tiny(topk=5, layers=1)
    steps: list[tuple] = []
    real = dispatch.dsa_decode_fp8
    monkeypatch.setattr(dispatch, "dsa_decode_fp8", lambda *a: steps.append(a) or real(*a))
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, IMG, (prompt_len,), generator=g).tolist()
    res = generate(model, [prompt, prompt[:3]], max_new_tokens=6)
    for r, p in ((res[0], prompt), (res[1], prompt[:3])):
        for i, (tok, lp) in enumerate(zip(r.token_ids, r.logprobs, strict=True)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + r.token_ids[:i]])).logits[0, -1].float()
            logits[IMG] = float("-inf")
            full = torch.log_softmax(logits, -1)
            assert int(full.argmax()) == tok and abs(float(full[tok]) - lp) < 1e-4
    assert len(steps) == 5  # every decode step took the FP8 cache
    # each step's selection: the reference on the dequantised cache; the Triton kernel (interpreter) agrees
    tri = dispatch._triton_table()["dsa_decode_fp8"]
    for q, kc, vc, q_idx, k8, sk, w, lens, topk, scale in steps:
        assert k8.dtype == FP8
        _, _, want = dsa_decode_reference(
            q, kc, vc, fake_quantize(q_idx), dequantize(k8, sk), w, lens, topk, scale
        )
        _, _, got = real(q, kc, vc, q_idx, k8, sk, w, lens, topk, scale)
        assert torch.equal(got, want)
        o_t, _, got_t = tri(q, kc, vc, q_idx, k8, sk, w, lens, topk, scale, seg_len=16, sample=16)
        assert torch.equal(got_t, want)
    assert int(steps[-1][7].max()) > 5  # the last steps were sparse (more rows than topk)


def test_fp8_training_step_has_finite_loss_and_gradients() -> None:
    model = _tiny(topk=4, layers=2).train()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, IMG, (31,), generator=g)
    cu = torch.tensor([0, 17, 31], dtype=torch.int32)
    out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
    assert torch.isfinite(out.lm_loss) and torch.isfinite(out.indexer_loss) and out.indexer_loss > 0
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    g_kl = torch.autograd.grad(out.indexer_loss, indexer, retain_graph=True)
    assert all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in g_kl)
    out.lm_loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".indexer." not in n and p.grad is not None]
    assert grads and all(torch.isfinite(x).all() for x in grads)
    assert model.lm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_fp8_model_on_cuda_in_bf16_selects_as_the_reference_on_dequantised_values(monkeypatch) -> None:
    """bf16 on CUDA, Triton FP8 kernels (e4m3 tensor-core dots, folded scales): every prefill top-k and decode
    selection recalls the reference on the dequantised values (differences only from near-ties in the rounding);
    a training step stays finite."""
    from keye.kernels import indexer_fp8
    from keye.model.generate import generate

    model = _tiny(topk=16, layers=2, index_dim=64).to("cuda", torch.bfloat16)
    assert dispatch.backend_name("dsa_decode_fp8", torch.zeros(1, device="cuda")) == "triton"
    recalls: list[float] = []
    real_topk, real_dec = dispatch.indexer_topk_fp8, dispatch.dsa_decode_fp8

    def topk(*a):  # noqa: ANN002, ANN202
        got = real_topk(*a)
        recalls.append(indexer_fp8.topk_recall(got[0], indexer_fp8.indexer_topk_fp8_reference(*a)[0]))
        return got

    def dec(*a):  # noqa: ANN002, ANN202
        got = real_dec(*a)
        assert a[4].dtype == FP8
        recalls.append(indexer_fp8.topk_recall(got[2], indexer_fp8.dsa_decode_fp8_reference(*a)[2]))
        return got

    monkeypatch.setattr(dispatch, "indexer_topk_fp8", topk)
    monkeypatch.setattr(dispatch, "dsa_decode_fp8", dec)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, IMG, (n,), generator=g).tolist() for n in (300, 77)]
    res = generate(model, prompts, max_new_tokens=6)
    assert all(len(r.token_ids) == 6 for r in res)
    assert len(recalls) == 2 + 2 * 5, recalls  # prefill per layer, then 5 decode steps per layer
    assert min(recalls) >= 0.9 and sum(recalls) / len(recalls) >= 0.98, recalls
    model.train()
    ids = torch.randint(0, IMG, (200,), generator=g).cuda()
    cu = torch.tensor([0, 120, 200], dtype=torch.int32, device="cuda")
    out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.indexer_loss is not None and torch.isfinite(out.indexer_loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
