"""The trainer's sharded path on 2 gloo CPU processes (`parallel` in the spec): FSDP2 fully_shard and DCP step
checkpoints written by every rank asynchronously; a run resumed from the step-2 checkpoint is bitwise the
uninterrupted run (metrics of step 3 and the final weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train_data import write_train_spec
from test_train_distributed import _launch

from keye.data.packing import read_pack_index
from keye.model import load_checkpoint
from keye.model.checkpoint import read_state
from keye.train.sharded_checkpoint import read_extra


@pytest.mark.slow
def test_fsdp2_dcp_checkpoint_resumes_bitwise(train_corpus: dict, tmp_path: Path) -> None:
    idx = read_pack_index(train_corpus["pack_index"])
    mean_pack = sum(idx.column("tokens").to_pylist()) / len(set(idx.column("pack_id").to_pylist()))
    settings = {
        "name": "pretrain", "kind": "pretrain", "steps": 3, "lr": 2e-3, "tokens_per_step": int(2 * mean_pack),
        "checkpoint_every": 2, "keep_last": 3, "shuffle": False, "seed": 1,
    }  # fmt: skip
    a = tmp_path / "a"
    full = _launch(write_train_spec(train_corpus, a, settings, parallel={}), 2)
    step2 = a / "step-000002"
    names = sorted(p.name for p in step2.iterdir())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "extra.safetensors", "meta.json"} <= set(names)
    assert "model" not in names  # nothing gathered to rank 0
    assert json.loads((step2 / "meta.json").read_text())["world_size"] == 2

    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(step2, b / "step-000002")
    resumed = _launch(write_train_spec(train_corpus, b, settings, parallel={}), 2)
    assert [m["step"] for m in resumed] == [3]
    for key in ("lm_loss", "grad_norm", "loss", "aux_loss"):
        assert resumed[0][key] == full[2][key], key
    wa, wb = read_state(a / "final"), read_state(b / "final")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    load_checkpoint(b / "final")  # the export reads back as a keye.model checkpoint


@pytest.mark.slow
def test_a_4_rank_checkpoint_resumes_on_2_and_1_with_the_same_batches(
    train_corpus: dict, tmp_path: Path
) -> None:
    """dp_shard=2 x ep=2 on 4 processes (experts sharded over ep and FSDP), checkpointed at step 2 of 3, resumed
    on 2 processes (dp_shard=2) and on 1: the weights and optimizer state reshard (DCP), the loader cursor is
    re-dealt, and step 3 takes the same 4 packs (global positions 8..11 of the epoch's order) with the loss of the
    uninterrupted run (float32 tolerance: other reduction orders); the same weights after it."""
    idx = read_pack_index(train_corpus["pack_index"])
    n_packs = len(set(idx.column("pack_id").to_pylist()))
    mean_pack = sum(idx.column("tokens").to_pylist()) / n_packs
    settings = {
        "name": "pretrain", "kind": "pretrain", "steps": 3, "lr": 2e-3, "tokens_per_step": int(4 * mean_pack),
        "checkpoint_every": 2, "keep_last": 3, "shuffle": True, "seed": 2,
    }  # fmt: skip
    a = tmp_path / "a"
    full = _launch(write_train_spec(train_corpus, a, settings, parallel={"dp_shard": 2, "ep": 2}), 4)
    assert [m["step"] for m in full] == [1, 2, 3]
    for world in (2, 1):
        b = tmp_path / f"on{world}"
        b.mkdir()
        shutil.copytree(a / "step-000002", b / "step-000002")
        resumed = _launch(write_train_spec(train_corpus, b, settings, parallel={}), world)
        assert [m["step"] for m in resumed] == [3]
        assert resumed[0]["target_tokens"] == full[2]["target_tokens"]
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert resumed[0][key] == pytest.approx(full[2][key], rel=1e-5), (world, key)
        cursors = read_extra(b / "step-000003")["loader"]
        ref = read_extra(a / "step-000003")["loader"]
        # the same global position of the same epoch: 4 ranks x 1 pack per step, 2 x 2, 1 x 4
        assert {(c["epoch"], c["next"] * c["world_size"]) for c in cursors} == {
            (c["epoch"], c["next"] * c["world_size"]) for c in ref
        }
        wa, wb = read_state(a / "final"), read_state(b / "final")
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
