"""The tiny model in DSA block-shared selection mode (dsa.selection=block): packed == one by one, the Triton
block-sparse path (interpreter) == the reference path, it trains (gradients, indexer KL), and the config validates."""

from __future__ import annotations

import pytest
import torch

from keye.kernels import dispatch
from keye.model import build_model, preset
from keye.model.config import DSAConfig, ModelConfig

VOCAB = 97


def _tiny(selection: str = "block", topk: int = 5, block: int = 4, layers: int = 2) -> torch.nn.Module:
    cfg = preset("tiny", vocab_size=VOCAB, image_token_id=96)
    cfg.lm.num_layers = layers
    cfg.lm.dsa.topk = topk
    cfg.lm.dsa.block = 8
    cfg.lm.dsa.selection = selection
    cfg.lm.dsa.selection_block = block
    cfg.set_attention_mode("dsa")
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def _packed(lengths: list[int], seed: int = 4) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, 96, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return samples, torch.cat(samples), cu


def test_block_mode_packed_equals_one_by_one_and_differs_from_token_mode() -> None:
    model = _tiny()
    samples, ids, cu = _packed([13, 1, 22])
    with torch.no_grad():
        packed = model(input_ids=ids, cu_seqlens=cu).logits
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in samples])
        token = _tiny("token")
        token.load_state_dict(model.state_dict())
        tok = token(input_ids=ids, cu_seqlens=cu).logits
    assert (packed - alone).abs().max() <= 1e-5 * max(1.0, float(alone.abs().max()))
    assert (packed - tok).abs().max() > 1e-3  # a different selection, a different result


def test_block_mode_triton_path_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny()
    _, ids, cu = _packed([19, 2, 24], seed=5)
    with torch.no_grad():
        monkeypatch.setenv("KEYE_KERNELS", "reference")
        ref = model(input_ids=ids, cu_seqlens=cu).logits
        monkeypatch.setenv("KEYE_KERNELS", "triton")
        assert dispatch.backend_name("block_sparse_attention", ids.float()) == "triton"
        got = model(input_ids=ids, cu_seqlens=cu).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_block_mode_trains_lm_and_indexer() -> None:
    model = _tiny().train()
    _, ids, cu = _packed([17, 14], seed=6)
    out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
    assert out.indexer_loss is not None and out.indexer_loss > 0
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    g_kl = torch.autograd.grad(out.indexer_loss, indexer, retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in g_kl)
    out.lm_loss.backward()
    assert model.lm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def _full_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the full forward's last row as generate sees them (the image placeholder masked)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    logits[model.config.image_token_id] = float("-inf")
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("prompt_len", [12, 13, 15])
def test_block_mode_decode_pools_the_block_so_far(prompt_len: int) -> None:
    """One layer: the cached K/V do not depend on any selection, so each decode step's logits must equal the full
    forward of the whole prefix at its last row, whose (partial) last block pools exactly the rows so far."""
    from keye.model.generate import generate

    model = _tiny(topk=5, block=4, layers=1)
    prompt = torch.randint(0, 96, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    res = generate(model, [prompt], max_new_tokens=7)[0]
    for i, (tok, lp) in enumerate(zip(res.token_ids, res.logprobs, strict=True)):
        full = _full_logprobs(model, prompt + res.token_ids[:i])
        assert int(full.argmax()) == tok
        assert abs(float(full[tok]) - lp) < 1e-4
    token = _tiny("token", topk=5, layers=1)
    token.load_state_dict(model.state_dict())
    assert generate(token, [prompt], max_new_tokens=7)[0].logprobs != res.logprobs  # block decode differs


def test_block_mode_decode_on_a_block_boundary_matches_the_full_forward() -> None:
    """Two layers, prompts ending on a block boundary (batched, unequal): the first decoded token opens a block
    of its own, so its logits equal the full forward's last row exactly as in training."""
    from keye.model.generate import generate

    model = _tiny(topk=5, block=4, layers=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (12, 20)]
    res = generate(model, prompts, max_new_tokens=2)
    for prompt, r in zip(prompts, res, strict=True):
        full = _full_logprobs(model, prompt)
        assert int(full.argmax()) == r.token_ids[0] and abs(float(full.max()) - r.logprobs[0]) < 1e-4


def test_selection_config_validates_and_roundtrips() -> None:
    with pytest.raises(ValueError, match="dsa.selection"):
        DSAConfig(selection="tokens")
    cfg = preset("tiny")
    cfg.lm.dsa.selection = "block"
    cfg.lm.dsa.selection_block = 32
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.lm.dsa.selection == "block" and back.lm.dsa.selection_block == 32


def test_selection_stats_tool_reads_a_checkpoint(tmp_path) -> None:
    import importlib.util
    from pathlib import Path

    from keye.model.checkpoint import save_checkpoint

    path = Path(__file__).resolve().parents[3] / "bench" / "dsa_selection_stats.py"
    spec = importlib.util.spec_from_file_location("dsa_selection_stats", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for selection in ("token", "block"):
        model = _tiny(selection, topk=6)
        save_checkpoint(model, tmp_path / selection)
        loaded = tool.load_checkpoint(tmp_path / selection)
        _, ids, cu = _packed([30, 21], seed=7)
        rows = tool.measure(loaded, ids, cu)
        assert [r["layer"] for r in rows] == [0, 1] and all(r["selection"] == selection for r in rows)
        assert all(0.0 <= r["jaccard"] <= 1.0 and 0 < r["fill"] <= 1.0 for r in rows)
        if selection == "block":  # tokens of one block share their keys: high overlap by construction
            assert min(r["jaccard"] for r in rows) > 0.5


@pytest.mark.gpu
def test_block_mode_cuda_triton_matches_cpu_reference_and_trains_in_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from keye.model.generate import generate

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _tiny(topk=6, block=8)
    _, ids, cu = _packed([45, 3, 70], seed=8)
    with torch.no_grad():
        monkeypatch.setenv("KEYE_KERNELS", "reference")
        cpu = model(input_ids=ids, cu_seqlens=cu).logits
        monkeypatch.setenv("KEYE_KERNELS", "auto")
        gpu = model.cuda()(input_ids=ids.cuda(), cu_seqlens=cu.cuda()).logits.cpu()
    # Triton's fp32 tl.dot runs in TF32 on the GPU (~1e-3 relative); a flipped selection would give O(1) errors
    assert (cpu - gpu).abs().max().item() < 1e-2 * max(1.0, cpu.abs().max().item())
    model = model.to(torch.bfloat16).train()
    out = model(input_ids=ids.cuda(), cu_seqlens=cu.cuda(), labels=ids.cuda())
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.indexer_loss is not None
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    res = generate(model.eval(), [[1, 2, 3, 4, 5, 6], [7, 8]], max_new_tokens=8)
    assert all(len(r.token_ids) == 8 for r in res)
