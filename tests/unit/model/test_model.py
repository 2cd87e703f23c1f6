"""keye.model: parity with transformers (Qwen3-MoE, SigLIP), packing, DSA modes, generation, checkpoints, sizes."""

from __future__ import annotations

import json

import pytest
import torch

from keye.model import ModelConfig, build_model, count_lm_params, load_checkpoint, save_checkpoint
from keye.model.config import VisionConfig, preset
from keye.model.convert import convert_hf
from keye.model.generate import Prompt, generate
from keye.model.patches import patchify
from keye.model.rope import mrope_positions
from keye.model.vision_tokens import frame_tokens

transformers = pytest.importorskip("transformers")

VOCAB = 97
IMG = 96  # image_token_id of the tiny test models


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 round-off relative to the logit scale."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def _tiny(mode: str = "dense", topk: int = 4, seed: int = 0, **lm) -> torch.nn.Module:
    cfg = preset("tiny", vocab_size=VOCAB, image_token_id=IMG)
    cfg.lm.dsa.topk = topk
    cfg.lm.dsa.block = 8  # several query blocks even on short inputs
    for k, v in lm.items():
        setattr(cfg.lm, k, v)
    cfg.set_attention_mode(mode)
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # larger weights than the 0.02 init so every path matters numerically
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def _hf_qwen(tmp_path, tie: bool):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
    )
    torch.manual_seed(1)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    src = tmp_path / "hf_qwen"
    hf.save_pretrained(src, max_shard_size="40KB" if not tie else "1GB")  # untied: experts spread over shards
    return hf, src


@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_moe_logit_parity(tmp_path, tie):
    hf, src = _hf_qwen(tmp_path, tie)
    vision = VisionConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, pos_grid=4)
    out = convert_hf(src, tmp_path / "ckpt", vision=vision, image_token_id=IMG)
    model = load_checkpoint(out)
    assert model.config.lm.tie_word_embeddings == tie
    assert tie or len(list(src.glob("*.safetensors"))) > 2
    ids = torch.randint(0, VOCAB - 1, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours = model(input_ids=ids).logits
    assert ours.shape == (2, 19, VOCAB)
    assert (ours - ref).abs().max().item() < 2e-5


def _hf_siglip(tmp_path):
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    torch.manual_seed(2)
    hf = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = tmp_path / "hf_siglip"
    hf.save_pretrained(src)
    return hf, src


def test_siglip_parity_native_and_interpolated(tmp_path):
    hf, src = _hf_siglip(tmp_path)
    model = load_checkpoint(convert_hf(src, tmp_path / "ckpt"))
    assert model.config.vision.rope_2d is False and model.config.vision.pos_grid == 4
    g = torch.Generator().manual_seed(3)
    for h, w in ((56, 56), (84, 56)):
        img = torch.randn(2, 3, h, w, generator=g)
        patches, grids = patchify(img)
        with torch.no_grad():
            ref = hf(pixel_values=img, interpolate_pos_encoding=(h, w) != (56, 56)).last_hidden_state
            ours = model.vision(patches, grids)
        assert (ours - ref.reshape(-1, 32)).abs().max().item() < 2e-5


def test_siglip_into_existing_checkpoint_keeps_the_lm(tmp_path):
    hf_lm, src_lm = _hf_qwen(tmp_path, tie=False)
    ckpt = convert_hf(
        src_lm, tmp_path / "ckpt", vision=VisionConfig(hidden_size=32, num_layers=1, num_heads=2)
    )
    _, src_vis = _hf_siglip(tmp_path)
    convert_hf(src_vis, ckpt)
    model = load_checkpoint(ckpt)
    ids = torch.randint(0, VOCAB - 1, (1, 9))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - hf_lm(input_ids=ids).logits).abs().max() < 2e-5
    assert model.config.vision.num_layers == 2


def test_30b_a3b_shape_counts():
    model = build_model("30b-a3b", device="meta")
    counts = count_lm_params(model)
    assert abs(counts["total"] / 30.5e9 - 1) < 0.01, counts
    assert abs(counts["active"] / 3.35e9 - 1) < 0.01, counts
    cfg = model.config.lm
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        48,
        2048,
        32,
        4,
        128,
    )
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.vocab_size) == (128, 8, 768, 151936)
    assert cfg.max_position_embeddings == 262144 and cfg.dsa.topk == 2048
    assert (model.config.vision.num_layers, model.config.vision.hidden_size) == (27, 1152)


def test_config_json_roundtrip_and_validation(tmp_path):
    for name in ("tiny", "small", "30b-a3b"):
        cfg = preset(name, vocab_size=1000, image_token_id=999)
        cfg.set_attention_mode("dsa", [0])
        cfg.to_json(tmp_path / f"{name}.json")
        back = ModelConfig.from_json(tmp_path / f"{name}.json")
        assert back == cfg
    data = json.loads(preset("tiny").to_json())
    data["lm"]["hidden_szie"] = 3
    with pytest.raises(ValueError, match="hidden_szie"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError):
        preset("tiny").set_attention_mode("sparse")


def _packed(samples: list[torch.Tensor]):
    ids = torch.cat(samples)
    cu = torch.tensor([0] + [len(s) for s in samples]).cumsum(0).to(torch.int32)
    return ids, cu


@pytest.mark.parametrize("mode", ["dense", "dsa"])
def test_packed_batch_equals_samples_one_by_one(mode):
    model = _tiny(mode, topk=4)
    g = torch.Generator().manual_seed(4)
    samples = [torch.randint(0, IMG, (n,), generator=g) for n in (7, 1, 12, 5)]
    ids, cu = _packed(samples)
    with torch.no_grad():
        packed = model(input_ids=ids, cu_seqlens=cu).logits
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in samples])
    assert _close(packed, alone)


def test_dsa_equals_dense_when_topk_covers_the_sample():
    dense = _tiny("dense")
    sparse = _tiny("dsa", topk=16)
    sparse.load_state_dict(dense.state_dict())
    ids, cu = _packed([torch.arange(16) % IMG, torch.arange(9) % IMG])
    with torch.no_grad():
        a = dense(input_ids=ids, cu_seqlens=cu).logits
        b = sparse(input_ids=ids, cu_seqlens=cu).logits
    assert torch.equal(a, b)
    small = _tiny("dsa", topk=2)
    small.load_state_dict(dense.state_dict())
    with torch.no_grad():
        c = small(input_ids=ids, cu_seqlens=cu).logits
    assert (a - c).abs().max().item() > 1e-3  # a real selection changes the result


def _frames(n: int, h: int, w: int, seed: int = 5):
    return patchify(torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed)))


def _vl_sample(text_a: int, n_frames: int, h: int, w: int, text_b: int, seed: int = 6):
    """Token ids with n_frames frame spans (a 'timestamp' token before each) and matching patches/positions."""
    patches, grids = _frames(n_frames, h, w, seed)
    per = frame_tokens(h, w)
    ids = [1] * text_a
    for i in range(n_frames):
        ids += [10 + i] + [IMG] * per
    ids += [2] * text_b
    ids = torch.tensor(ids)
    merged = [(h // 28, w // 28)] * n_frames
    return ids, patches, grids, mrope_positions(ids, IMG, merged)


def test_vlm_packed_with_frames_equals_one_by_one():
    model = _tiny("dsa", topk=4)
    ids1, p1, g1, pos1 = _vl_sample(3, 2, 56, 84, 4)
    ids2 = torch.randint(0, IMG, (6,))
    ids3, p3, g3, pos3 = _vl_sample(2, 1, 28, 56, 2, seed=7)
    pos2 = torch.arange(6)[None].expand(3, -1)
    ids, cu = _packed([ids1, ids2, ids3])
    with torch.no_grad():
        packed = model(
            input_ids=ids,
            position_ids=torch.cat([pos1, pos2, pos3], 1),
            cu_seqlens=cu,
            pixel_patches=torch.cat([p1, p3]),
            patch_grids=torch.cat([g1, g3]),
            vision_cu_seqlens=torch.tensor([0, 24, 48, 56], dtype=torch.int32),
        ).logits
        one = model(input_ids=ids1, position_ids=pos1, pixel_patches=p1, patch_grids=g1).logits
        three = model(input_ids=ids3, position_ids=pos3, pixel_patches=p3, patch_grids=g3).logits
        text_only = model(input_ids=ids1, position_ids=pos1, pixel_patches=p1 * 0, patch_grids=g1).logits
    assert _close(packed[: len(ids1)], one)
    assert _close(packed[-len(ids3) :], three)
    assert (one - text_only).abs().max() > 1e-3  # pixels reach the logits
    with pytest.raises(ValueError, match="placeholder"):
        model(input_ids=ids1[:-6], pixel_patches=p1, patch_grids=g1)


@pytest.mark.parametrize("mode", ["dense", "dsa"])
def test_generation_with_cache_matches_full_forward(mode):
    model = _tiny(mode, topk=4)
    vl_ids, patches, grids, _ = _vl_sample(2, 1, 56, 56, 3)
    prompts = [Prompt(torch.tensor([5, 6, 7, 8, 9, 10, 11])), Prompt(vl_ids, patches, grids), [3, 4]]
    results = generate(model, prompts, max_new_tokens=6, temperature=0.0)
    for prompt, res in zip(prompts, results, strict=True):
        p = prompt if isinstance(prompt, Prompt) else Prompt(torch.tensor(prompt))
        full = torch.cat([torch.as_tensor(p.input_ids), torch.tensor(res.token_ids[:-1])])
        merged = (
            [(int(h) // 2, int(w) // 2) for _, h, w in p.patch_grids.tolist()]
            if p.patch_grids is not None
            else []
        )
        pos = mrope_positions(full, IMG, merged)
        with torch.no_grad():
            logits = model(
                input_ids=full, position_ids=pos, pixel_patches=p.pixel_patches, patch_grids=p.patch_grids
            ).logits
        logits[:, IMG] = float("-inf")  # generate never emits the image placeholder
        logp = torch.log_softmax(logits[len(p.input_ids) - 1 :].float(), -1)
        assert res.token_ids == logp.argmax(-1).tolist()
        expected = logp.gather(1, torch.tensor(res.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(res.logprobs), expected, atol=1e-4)
        assert res.finish_reason == "length" and len(res.token_ids) == 6


@pytest.mark.parametrize("mode", ["dense", "dsa", "block"])
def test_generation_shares_the_prefill_of_repeated_prompt_objects(mode):
    """A rollout group passes the same Prompt tensors G times: prefilled once, the samples must equal those of
    G separate copies of the prompt (same per-row generators)."""
    if mode == "block":
        model = _tiny("dsa", topk=4)
        model.config.lm.dsa.selection = "block"
    else:
        model = _tiny(mode, topk=4)
    vl_ids, patches, grids, _ = _vl_sample(2, 1, 56, 56, 3)
    text = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13])

    def rows(shared: bool) -> list[Prompt]:
        out = []
        for i, (ids, pp, gg) in enumerate([(vl_ids, patches, grids), (text, None, None)]):
            for k in range(3):
                a, b, c = (ids, pp, gg) if shared else (ids.clone(), _clone(pp), _clone(gg))
                out.append(Prompt(a, b, c, generator=torch.Generator().manual_seed(100 * i + k)))
        return out

    shared = generate(model, rows(True), max_new_tokens=7, temperature=1.0)
    apart = generate(model, rows(False), max_new_tokens=7, temperature=1.0)
    for s, a in zip(shared, apart, strict=True):
        assert s.token_ids == a.token_ids and s.prompt_len == a.prompt_len
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(a.logprobs), atol=1e-5)
    assert len({tuple(r.token_ids) for r in shared[:3]}) > 1  # the samples of one prompt differ


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def test_generation_sampling_stop_strings_and_eos():
    model = _tiny("dense")
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)
    g = torch.Generator().manual_seed(0)
    res = generate(
        model, [[1, 2, 3]] * 3, max_new_tokens=8, temperature=1.0, top_p=0.9, generator=g, decode=decode
    )
    assert all(len(r.token_ids) == 8 and len(r.logprobs) == 8 for r in res)
    assert all(lp <= 0 for r in res for lp in r.logprobs)
    first = generate(model, [[1, 2, 3]], max_new_tokens=8, decode=decode)[0]
    stop = first.text[2:4]
    res = generate(model, [[1, 2, 3]], max_new_tokens=8, decode=decode, stop_strings=[stop])[0]
    assert res.finish_reason == "stop" and res.text == first.text[: first.text.find(stop)]
    res = generate(model, [[1, 2, 3]], max_new_tokens=8, eos_token_ids=[first.token_ids[1]])[0]
    assert (
        res.finish_reason == "eos"
        and res.token_ids == first.token_ids[: first.token_ids.index(first.token_ids[1]) + 1]
    )


def test_checkpoint_roundtrip_sharded_no_pickle(tmp_path):
    model = _tiny("dsa", topk=3, tie_word_embeddings=True)
    out = save_checkpoint(model, tmp_path / "ck", max_shard_bytes=200_000)
    files = sorted(p.name for p in out.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert all(f.endswith((".safetensors", ".json")) for f in files)
    loaded = load_checkpoint(out)
    assert loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight
    assert loaded.config == model.config
    ids = torch.randint(0, IMG, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    half = load_checkpoint(save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    save_checkpoint(model, tmp_path / "ck")  # overwrite in place stays loadable and leaves no temp dirs
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids, cu = _packed([torch.randint(0, IMG, (n,), generator=g) for n in (20, 13)])
    return ids, cu


def test_training_gradients_by_mode():
    ids, cu = _batch()
    # dense: every non-indexer parameter learns from the LM loss; the indexer is untouched
    model = _tiny("dense").train()
    out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
    assert out.logits is None and out.indexer_loss is None and out.num_tokens == 31
    out.loss.backward()
    for name, p in model.lm.named_parameters():
        if ".indexer." in name:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # dsa_warmup and dsa: the indexer loss reaches only the indexer; the LM loss never reaches it
    for mode in ("dsa_warmup", "dsa"):
        model = _tiny(mode, topk=4).train()
        out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
        assert out.indexer_loss is not None and out.indexer_loss > 0
        indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
        others = [p for n, p in model.named_parameters() if ".indexer." not in n]
        g_kl = torch.autograd.grad(out.indexer_loss, indexer + others, allow_unused=True, retain_graph=True)
        assert all(g is not None for g in g_kl[: len(indexer)])
        assert all(g is None for g in g_kl[len(indexer) :])
        g_lm = torch.autograd.grad(out.lm_loss, indexer, allow_unused=True)
        assert all(g is None for g in g_lm)


def test_aux_loss_free_bias_steers_routing():
    model = _tiny("dense", router_bias=True)
    moe = model.lm.layers[0].mlp
    x = torch.randn(64, model.config.lm.hidden_size, generator=torch.Generator().manual_seed(0))
    y0, aux0 = moe(x)
    moe.update_router_bias(torch.tensor([10, 0, 5, 5]), rate=0.5)  # sign rule: over-loaded down, idle up
    assert moe.router_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    moe.router_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # a large bias puts expert 3 in every top-k set
    _, aux = moe(x)
    assert aux.expert_counts[3] == 64 and aux0.expert_counts[3] < 64
    assert torch.equal(aux.router_probs, aux0.router_probs)  # the bias never changes the probabilities
    assert "lm.layers.0.mlp.router_bias" in model.state_dict()  # persisted when enabled


def test_tiny_model_learns_a_batch():
    ids, cu = _batch(1)
    model = _tiny("dsa", topk=4).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_loss_matches_plain_cross_entropy_with_shift_inside_samples():
    model = _tiny("dense")
    ids, cu = _batch(2)
    labels = ids.clone()
    labels[3] = -100
    with torch.no_grad():
        out = model(input_ids=ids, cu_seqlens=cu, labels=labels, return_logits=True, loss_chunk=7)
    logits = out.logits
    targets = torch.cat([labels[1:20], torch.tensor([-100]), labels[21:], torch.tensor([-100])])
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    assert torch.allclose(out.lm_loss, ref, atol=1e-5)
    assert out.num_tokens == int((targets != -100).sum())
