"""Each stage kind does what it says; schedules, metrics, NaN guard and checkpoint housekeeping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from keye.data.loader import open_loader
from keye.data.tokenizer import load_tokenizer
from keye.model import build_model, load_checkpoint, save_checkpoint
from keye.model.checkpoint import read_state
from keye.model.lm import shifted_targets
from keye.model.vlm import KeyeVL
from keye.train import NonFiniteLoss, StageSettings, train_stage
from keye.train.checkpointing import list_checkpoints
from keye.train.metrics import topk_mass_share, training_flops
from keye.train.schedules import lr_multiplier
from keye.train.trainer import _seq_mean_losses, stage_labels


def _init(train_corpus: dict, tmp_path: Path) -> tuple[Path, dict]:
    model = build_model(
        "tiny", vocab_size=train_corpus["vocab_size"], image_token_id=train_corpus["image_token_id"], seed=0
    )
    d = save_checkpoint(model, tmp_path / "init")
    return d, read_state(d)


def _train(
    train_corpus: dict, tmp_path: Path, init: Path | None, name: str, **kw: object
) -> tuple[dict, list]:
    logged: list = []
    s = StageSettings(name=name, steps=kw.pop("steps", 2), lr=kw.pop("lr", 1e-3), tokens_per_step=400, **kw)
    res = train_stage(
        s,
        init_checkpoint=init,
        out_dir=tmp_path / name,
        log_metrics=lambda m, st: logged.append((st, m)),
        **train_corpus,
    )
    return read_state(res.checkpoint_dir), logged


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_align_trains_only_the_projector(train_corpus: dict, tmp_path: Path) -> None:
    init, before = _init(train_corpus, tmp_path)
    after, logged = _train(train_corpus, tmp_path, init, "align", kind="align")
    changed = _changed(before, after)
    assert changed and all(k.startswith("projector.") for k in changed)
    assert {k for k in before if k.startswith("projector.")} == changed
    assert logged[-1][1]["lm_loss"] > 0


def test_long_warmup_trains_only_the_indexer_with_the_kl_loss(train_corpus: dict, tmp_path: Path) -> None:
    init, before = _init(train_corpus, tmp_path)
    after, logged = _train(
        train_corpus, tmp_path, init, "long_warmup", kind="long_warmup", lr=1e-2, rope_base=5e4
    )
    changed = _changed(before, after)
    assert changed and all(".indexer." in k for k in changed)
    m = logged[-1][1]
    assert m["indexer_kl"] > 0 and 0 < m["dsa_topk_mass_share"] <= 1 + 1e-6
    model = load_checkpoint(tmp_path / "long_warmup" / "final")
    assert set(model.config.lm.attention_modes) == {"dsa_warmup"}  # dense attention + KL-trained indexer
    assert model.config.lm.rope_theta == 5e4


def test_long_sparse_trains_everything_and_the_indexer_learns_only_from_kl(
    train_corpus: dict, tmp_path: Path
) -> None:
    init, before = _init(train_corpus, tmp_path)
    after, logged = _train(train_corpus, tmp_path, init, "long_sparse", kind="long_sparse")
    changed = _changed(before, after)
    assert any(".indexer." in k for k in changed) and any(k.startswith("lm.layers.0.mlp") for k in changed)
    assert set(load_checkpoint(tmp_path / "long_sparse" / "final").config.lm.attention_modes) == {"dsa"}
    # the indexer input is detached: the LM loss alone gives the indexer no gradient, the KL gives it one
    model = load_checkpoint(init).train()
    model.set_attention_mode("dsa")
    model.config.lm.dsa.topk = 4  # make the selection sparse for these short samples
    ids = torch.randint(0, train_corpus["vocab_size"] - 2, (40,))
    out = model(input_ids=ids, labels=ids)
    out.lm_loss.backward(retain_graph=True)
    idx = [p for n, p in model.named_parameters() if ".indexer." in n]
    assert all(p.grad is None or not p.grad.any() for p in idx)
    assert any(
        p.grad is not None and p.grad.any() for n, p in model.named_parameters() if ".indexer." not in n
    )
    out.indexer_loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in idx)


def test_block_selection_trains_saves_and_generates_in_block_mode(
    train_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe's dsa_selection goes into the checkpoint's model config: the loaded model decodes in block mode."""
    from keye.model.generate import generate

    init, before = _init(train_corpus, tmp_path)
    after, logged = _train(
        train_corpus, tmp_path, init, "long_sparse", kind="long_sparse", steps=1, dsa_selection="block",
        dsa_selection_block=8,
    )  # fmt: skip
    assert _changed(before, after) and logged[-1][1]["indexer_kl"] > 0
    model = load_checkpoint(tmp_path / "long_sparse" / "final")
    dsa = model.config.lm.dsa
    assert (dsa.selection, dsa.selection_block) == ("block", 8)
    assert set(model.config.lm.attention_modes) == {"dsa"}
    dsa.topk = 4  # sparse for these short prompts
    from keye.kernels import dispatch

    calls: list[int] = []
    real = dispatch.block_decode
    monkeypatch.setattr(dispatch, "block_decode", lambda *a: calls.append(1) or real(*a))
    res = generate(model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4, 5]], max_new_tokens=3)
    assert all(len(r.token_ids) == 3 for r in res)
    assert len(calls) == 2 * model.config.lm.num_layers  # two decode steps, every layer in block mode


def test_fp8_indexer_trains_saves_and_decodes_through_the_fp8_cache(
    train_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe's dsa_indexer_dtype=fp8 trains (finite KL), lands in the checkpoint's model config, and the loaded
    model decodes through the FP8 indexer key cache."""
    import math

    from keye.kernels import dispatch
    from keye.model.generate import generate

    init, before = _init(train_corpus, tmp_path)
    after, logged = _train(
        train_corpus, tmp_path, init, "long_sparse", kind="long_sparse", steps=1, dsa_indexer_dtype="fp8"
    )
    assert (
        _changed(before, after)
        and math.isfinite(logged[-1][1]["indexer_kl"])
        and logged[-1][1]["indexer_kl"] > 0
    )
    model = load_checkpoint(tmp_path / "long_sparse" / "final")
    assert model.config.lm.dsa.indexer_dtype == "fp8"
    model.config.lm.dsa.topk = 4  # sparse for these short prompts
    calls: list[int] = []
    real = dispatch.dsa_decode_fp8
    monkeypatch.setattr(dispatch, "dsa_decode_fp8", lambda *a: calls.append(1) or real(*a))
    res = generate(model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4, 5]], max_new_tokens=3)
    assert all(len(r.token_ids) == 3 for r in res)
    assert len(calls) == 2 * model.config.lm.num_layers  # two decode steps, every layer on the FP8 cache


def test_sft_loss_is_answer_only_and_pretrain_loss_covers_the_text(train_corpus: dict) -> None:
    tok = load_tokenizer(train_corpus["tokenizer_dir"])
    batch = next(
        iter(open_loader(train_corpus["pack_index"], train_corpus["shards"], tok, train_corpus["policy"]))
    )
    sft = StageSettings(name="sft", kind="sft", steps=1, lr=1e-3, tokens_per_step=10)
    pre = StageSettings(name="pretrain", kind="pretrain", steps=1, lr=1e-3, tokens_per_step=10)
    ls = stage_labels(batch, sft, tok.image_id, 0)
    lp = stage_labels(batch, pre, tok.image_id, 0)
    assert torch.equal(ls, batch.labels)  # answer only: the loader's labels
    assert (lp != -100).sum() > 3 * (ls != -100).sum()  # prompts too ...
    assert not (lp[batch.input_ids == tok.image_id] != -100).any()  # ... but never the visual placeholders
    only_mcq = StageSettings(
        name="m", kind="sft", steps=1, lr=1e-3, tokens_per_step=10, task_weights={"mcq": 1}
    )
    lm = stage_labels(batch, only_mcq, tok.image_id, 0)
    cu = batch.cu_seqlens.tolist()
    for j, sid in enumerate(batch.sample_ids):
        kept = (lm[cu[j] : cu[j + 1]] != -100).any()
        assert bool(kept) == (sid.split(":")[1] == "mcq")
    assert only_mcq.tasks() == ["mcq"]


def test_seq_mean_token_mean_weighs_each_sample_once(train_corpus: dict) -> None:
    """The objective is the sum of per-sample mean token losses (so a long answer counts as much as a short one),
    while the logged lm_loss stays the token mean the model itself computes."""
    tok = load_tokenizer(train_corpus["tokenizer_dir"])

    def answer_lengths(b):  # target tokens of each sample of a pack
        t = shifted_targets(b.labels, b.cu_seqlens)
        cu = b.cu_seqlens.tolist()
        return [int((t[a:z] != -100).sum()) for a, z in zip(cu[:-1], cu[1:], strict=True)]

    loader = open_loader(train_corpus["pack_index"], train_corpus["shards"], tok, train_corpus["policy"])
    batch = next(b for b in loader if len(set(answer_lengths(b)) - {0}) >= 2)
    model = build_model(
        "tiny", vocab_size=train_corpus["vocab_size"], image_token_id=train_corpus["image_token_id"], seed=0
    )
    inputs = batch.model_inputs()
    inputs["labels"] = batch.labels
    with torch.no_grad():
        ref = model(**inputs, return_logits=True)
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, return_logits=False)
        token_mean, objective = _seq_mean_losses(out.hidden, model, inputs)
    targets = shifted_targets(batch.labels, batch.cu_seqlens)
    per_token = torch.nn.functional.cross_entropy(
        ref.logits.float(), targets, ignore_index=-100, reduction="none"
    )
    cu = batch.cu_seqlens.tolist()
    means = [
        per_token[a:b][targets[a:b] != -100].mean()
        for a, b in zip(cu[:-1], cu[1:], strict=True)
        if (targets[a:b] != -100).any()
    ]
    counts = {int((targets[a:b] != -100).sum()) for a, b in zip(cu[:-1], cu[1:], strict=True)} - {0}
    assert len(means) >= 2 and len(counts) >= 2  # samples with answers of different lengths
    torch.testing.assert_close(objective, torch.stack(means).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_mean, ref.lm_loss, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(objective / len(means), token_mean)  # the two weightings do differ here


def test_seq_mean_logs_the_same_first_loss_and_takes_a_different_step(
    train_corpus: dict, tmp_path: Path
) -> None:
    init, _ = _init(train_corpus, tmp_path)
    a, la = _train(train_corpus, tmp_path, init, "tok", kind="sft", steps=1)
    b, lb = _train(
        train_corpus, tmp_path, init, "seq", kind="sft", steps=1, loss_agg_mode="seq-mean-token-mean"
    )
    assert la[0][1]["lm_loss"] == pytest.approx(lb[0][1]["lm_loss"], rel=1e-5)
    assert _changed(a, b)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        StageSettings(name="x", kind="sft", steps=1, lr=1e-3, tokens_per_step=10, loss_agg_mode="sample")


def test_stage_settings_reject_contradictions() -> None:
    with pytest.raises(ValueError, match="projector"):
        StageSettings(name="a", kind="align", steps=1, lr=1, tokens_per_step=1, trainable="all")
    with pytest.raises(ValueError, match="indexer"):
        StageSettings(name="w", kind="long_warmup", steps=1, lr=1, tokens_per_step=1, attention_mode="dsa")
    with pytest.raises(ValueError):
        StageSettings(name="x", kind="sft", steps=1, lr=1, tokens_per_step=1, typo_field=3)


def test_schedules() -> None:
    assert lr_multiplier(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    wsd = [lr_multiplier(s, 100, 0, "wsd", min_ratio=0.0, decay_fraction=0.2) for s in range(100)]
    assert wsd[79] == 1.0 and wsd[80] < 1.0 and wsd[99] == pytest.approx(0.0)
    assert lr_multiplier(50, 100, 0, "constant") == 1.0


def test_metrics_count_sparse_attention_as_sparse_and_topk_share() -> None:
    model = build_model("tiny", vocab_size=300, image_token_id=5)
    cfg = model.config.lm
    dense = training_flops(cfg, [4096], modes=["dense"] * cfg.num_layers)
    sparse = training_flops(cfg, [4096], modes=["dsa"] * cfg.num_layers)
    short = training_flops(cfg, [32], modes=["dense"] * cfg.num_layers)
    assert sparse < dense and short < dense
    torch.manual_seed(0)
    q, k = torch.randn(16, 4, 8), torch.randn(16, 2, 8)
    qi, ki, w = torch.randn(16, 2, 4), torch.randn(16, 4), torch.rand(16, 2)
    assert topk_mass_share(q, k, qi, ki, w, topk=16, scale=0.35) == pytest.approx(1.0)
    part = topk_mass_share(q, k, qi, ki, w, topk=3, scale=0.35)
    assert 0 < part < 1


def test_nan_step_is_skipped_or_stops_and_never_checkpointed(
    train_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = KeyeVL.forward
    calls = {"n": 0}

    def poisoned(self: KeyeVL, *a: object, **kw: object):  # the 2nd micro-batch returns a NaN loss
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            out.lm_loss = out.lm_loss * float("nan")
        return out

    monkeypatch.setattr(KeyeVL, "forward", poisoned)
    after, logged = _train(train_corpus, tmp_path, None, "skip", kind="pretrain", steps=3, checkpoint_every=1)
    assert logged[-1][1]["skipped_steps"] == 1.0
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    calls["n"] = 0
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        _train(
            train_corpus,
            tmp_path,
            None,
            "stop",
            kind="pretrain",
            steps=3,
            nan_policy="stop",
            checkpoint_every=1,
        )
    assert list_checkpoints(tmp_path / "stop") == []  # step 1 used the poisoned micro-batch: nothing saved


def test_keep_last_and_no_temp_dirs_and_bias_balancing(train_corpus: dict, tmp_path: Path) -> None:
    after, logged = _train(
        train_corpus, tmp_path, None, "bias", kind="pretrain", steps=3, checkpoint_every=1, moe_balance="bias"
    )
    out = tmp_path / "bias"
    assert [s for s, _ in list_checkpoints(out)] == [2, 3]
    assert not list(out.glob(".*"))
    assert any(k.endswith("router_bias") and v.abs().sum() > 0 for k, v in after.items())
    assert load_checkpoint(out / "final").config.lm.router_bias
    meta = json.loads((out / "step-000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["kind"] == "pretrain"
    assert math.isfinite(logged[-1][1]["expert_load_max_over_mean"])


def test_missing_shards_fail_loudly_instead_of_hanging(train_corpus: dict, tmp_path: Path) -> None:
    broken = {**train_corpus, "shards": {"nothing.tar": str(tmp_path / "nothing.tar")}}
    with pytest.raises(RuntimeError, match="no usable sample"):
        _train(broken, tmp_path, None, "broken", kind="pretrain", steps=2)
