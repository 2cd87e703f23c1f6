"""`keye plan` (keye.train.plan): hand-computed terms on the tiny preset, the measured single-GPU peaks of
bench/RESULTS.md (## train and ## dsa, H200, bf16 weights and AdamW states, `python3 bench/train.py`), and the
suggested meshes for 30B-A3B."""

from __future__ import annotations

import pytest

from keye.model.config import preset
from keye.train.plan import GIB, count_params, layer_activation_elems, memory_plan, suggest_mesh


def test_tiny_terms_by_hand() -> None:
    cfg = preset("tiny", vocab_size=1000)
    pc = count_params(cfg)
    # q 128x128 + k, v 128x64 + o 128x128 + q/k norms 2x32 + two RMSNorms 2x128 = 49,472; indexer: wq 128x(2x16)
    # + wk 128x16 + LayerNorm 2x16 + weights 128x2 = 6,432; router 128x4 = 512
    assert pc.per_layer_dense == 49_472 + 6_432 + 512
    assert pc.per_layer_experts == 4 * 3 * 128 * 128
    # embeddings + lm_head 2 x 1000 x 128 + final norm 128
    assert pc.root == 2 * 1000 * 128 + 128
    assert pc.experts == 4 * pc.per_layer_experts
    # attention 2h + 2q + 2kv + q + kv + kv + q + 2 heads + h = 256 + 384 + 192 + 64 + 136 + 128 = 1,160;
    # MoE 2h + 4E + k(3h + 4f) = 256 + 16 + 2 x (384 + 512) = 2,064; DSA + q 2x16 + k 16 + w 2 + 2 x top-k 64
    assert layer_activation_elems(cfg.lm, dsa=False) == 1_160 + 2_064
    assert layer_activation_elems(cfg.lm, dsa=True) == 1_160 + 2_064 + 32 + 16 + 2 + 128

    seq = 4096
    p = memory_plan("tiny", 4, seq, (2, 2, 1), attention="dense", vocab_size=1000)
    assert p.parts_gib["optimizer"] == round(pc.total * 8 / 4 / GIB, 3)  # two fp32 moments, 1/4 each
    assert p.parts_gib["activations"] == round(4 * seq * 128 * 2 / GIB, 3)  # 4 layer inputs in bf16
    assert p.parts_gib["ep_buffers"] == round(2 * seq * 2 * 128 * 2 / GIB, 3)  # top-2 copies, both ways
    loss = 4096 * 1000 * 10 + seq * 128 * 4
    assert p.parts_gib["recompute_or_loss"] == round(max(seq * 3_224 * 2, loss) / GIB, 3)
    p2 = memory_plan("tiny", 4, seq, (1, 2, 2), attention="dense", vocab_size=1000)
    assert p2.parts_gib["activations"] == p.parts_gib["activations"] / 2  # cp=2 halves the tokens per rank


# measured peaks (bench/RESULTS.md): (preset, layers, seq, attention, act. ckpt, GiB)
MEASURED = [
    ("30b-a3b", 4, 32768, "dense", False, 49.0),  # ## train: 30B-A3B slice, 4 layers, one 32K sequence
    ("small", None, 262144, "dsa", True, 30.6),  # ## train / ## dsa: DSA token top-k 2048 at 256K
    ("small", None, 262144, "dense", True, 28.7),  # ## dsa: dense at 256K
    ("small", None, 131072, "dense", True, 17.2),  # ## dsa
    ("small", None, 131072, "dsa", True, 20.0),
    ("small", None, 65536, "dense", True, 14.8),
    ("small", None, 65536, "dsa", True, 14.8),
]


@pytest.mark.parametrize(("name", "layers", "seq", "attention", "ckpt", "gib"), MEASURED)
def test_single_gpu_prediction_against_the_measured_peak(name, layers, seq, attention, ckpt, gib) -> None:
    # bench/train.py: bf16 weights and AdamW states, one ViT layer, no FSDP
    p = memory_plan(
        name, 1, seq, (1, 1, 1), attention=attention, act_ckpt=ckpt, precision="bf16",
        layers=layers, vision_layers=1,
    )  # fmt: skip
    assert p.total_gib == pytest.approx(gib, rel=0.15)


def test_30b_meshes_at_32k_and_256k() -> None:
    plan32, _ = suggest_mesh("30b-a3b", 64, 32768)
    assert plan32.mesh == (8, 8, 1)
    plan256, tried = suggest_mesh("30b-a3b", 64, 262144)
    assert plan256.mesh == (4, 8, 2)
    assert tried[0].mesh == (8, 8, 1) and not tried[0].fits(0.85 * 139.8)  # cp=1 does not leave room
    # the states are 1/64 of the model: 16 bytes per parameter in mixed precision
    assert plan256.parts_gib["params"] + plan256.parts_gib["grads"] + plan256.parts_gib["optimizer"] == (
        pytest.approx(16 * plan256.params.total / 64 / GIB, abs=0.01)
    )


def test_cli() -> None:
    from typer.testing import CliRunner

    from keye.cli import app

    out = CliRunner().invoke(app, ["plan", "--preset", "30b-a3b", "--gpus", "64", "--seq", "262144"])
    assert out.exit_code == 0, out.output
    assert "mesh: dp_shard=4 x ep=8 x cp=2 = 64 GPUs" in out.output
    bad = CliRunner().invoke(app, ["plan", "--gpus", "8", "--ep", "3"])
    assert bad.exit_code == 2 and "does not divide --gpus 8" in bad.output
