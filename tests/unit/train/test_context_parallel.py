"""Context parallelism (keye.model.context_parallel) on 2 gloo CPU processes: a packed batch of 4 samples split in
load-balanced chunks that cut through samples; dense attention (DSA warm-up: dense + the indexer's dense KL) and DSA (indexer top-k over keys held by the other
rank, sparse gather, indexer KL) give the single-process loss and gradients (float32 tolerance), on the default
kernels (CPU: SDPA for dense attention, the reference for the rest) and with the Triton kernels forced
(KEYE_KERNELS=triton under the interpreter: the indexer top-k and KL with a query-row offset, sparse attention over
gathered keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_launch import launch
from safetensors.torch import load_file

from keye.model.context_parallel import balanced_rows


def test_causal_load_balance_split() -> None:
    assert balanced_rows(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert balanced_rows(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # causal work (query-key pairs of one 16-row sample) is the same on both ranks
    work = [sum(int(r) + 1 for r in balanced_rows(16, 2, rank)) for rank in (0, 1)]
    assert work[0] == work[1]
    with pytest.raises(ValueError, match="pad the pack"):
        balanced_rows(18, 2, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attention", "kernels"), [("dsa_warmup", "auto"), ("dsa", "auto"), ("dsa", "triton")]
)  # dense attention + dense KL; top-k + sparse + KL (Triton: one layer, the interpreter is slow)
def test_cp2_loss_and_gradients_equal_one_process(
    tmp_path: Path, attention: str, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYE_KERNELS", kernels)  # the workers inherit it
    spec = {"mode": "cp", "attention": attention, "topk": 8, **({"layers": 1} if kernels == "triton" else {})}
    one = launch({**spec, "grads": str(tmp_path / "g1.safetensors")}, 1, tmp_path, "cp1")
    two = launch({**spec, "grads": str(tmp_path / "g2.safetensors")}, 2, tmp_path, "cp2")
    assert two["rows"] == [*range(24), *range(72, 96)]  # rank 0: the first and the last chunk
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=0)
    assert one["indexer_loss"] > 0
    assert two["indexer_loss"] == pytest.approx(one["indexer_loss"], rel=1e-5, abs=0)
    g1, g2 = load_file(tmp_path / "g1.safetensors"), load_file(tmp_path / "g2.safetensors")
    assert sorted(g1) == sorted(g2)
    assert any(".indexer." in k for k in g1)  # the KL trains the indexer
    for name in g1:
        scale = float(g1[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
