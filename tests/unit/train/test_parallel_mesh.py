"""The device mesh from config (keye.train.parallel): validated against the world size and the model, shown by
`keye doctor`, recorded in the train stage's MLflow params."""

from __future__ import annotations

from pathlib import Path

import pytest

from keye.core.config import ConfigError, load_config
from keye.doctor import check_mesh
from keye.train.parallel import MeshError, MeshShape, ParallelSettings, resolve_mesh

ROOT = Path(__file__).resolve().parents[3]


def test_dp_shard_takes_what_ep_and_cp_leave() -> None:
    shape = resolve_mesh(ParallelSettings(ep=8, cp=4), 64, num_experts=128)
    assert shape == MeshShape(2, 8, 4)
    assert shape.data_parallel == 16
    assert shape.as_params() == {
        "parallel.dp_shard": 2,
        "parallel.ep": 8,
        "parallel.cp": 4,
        "parallel.world": 64,
    }


@pytest.mark.parametrize(
    ("settings", "world", "experts", "message"),
    [
        (ParallelSettings(ep=3), 8, 128, "ep=3 x cp=1 = 3 does not divide the world size 8"),
        (ParallelSettings(dp_shard=2, ep=2), 8, 128, "set dp_shard to 4 or leave it out"),
        (ParallelSettings(ep=8), 8, 4, "ep=8 does not divide the model's 4 experts"),
    ],
)
def test_a_mesh_that_cannot_be_built_names_the_number_to_change(settings, world, experts, message) -> None:
    with pytest.raises(MeshError, match=message):
        resolve_mesh(settings, world, experts)


def test_config_section_and_doctor(tmp_path: Path) -> None:
    stages = "  stages: [{name: a, kind: pretrain, steps: 1, lr: 1.0e-3, tokens_per_step: 100}]\n"
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  preset: 30b-a3b\n  parallel: {ep: 8, cp: 2}\n" + stages)
    assert load_config(good).train.parallel == ParallelSettings(ep=8, cp=2)
    check = check_mesh(good, world=64)
    assert check.ok and check.detail.startswith("30b-a3b: dp_shard=4 x ep=8 x cp=2 = 64 ranks")
    bad = check_mesh(good, world=24)
    assert not bad.ok and "does not divide the world size 24" in bad.detail
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  parallel: {tp: 2}\n" + stages)
    with pytest.raises(ConfigError, match="train.parallel.tp"):
        load_config(typo)


def test_train_params_carry_the_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    from keye.stages.train import params

    cfg = load_config(ROOT / "pipelines.yaml", overrides=["train.parallel.ep=2"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    p = params(cfg, cfg.train.stages[0])
    assert {k: v for k, v in p.items() if k.startswith("parallel.")} == {
        "parallel.dp_shard": 2,
        "parallel.ep": 2,
        "parallel.cp": 1,
        "parallel.world": 4,
    }


def test_the_trainer_refuses_a_mesh_it_cannot_run_before_any_work() -> None:
    """keye.train.sharded_training.check_parallel (the Trainer calls it first, with the model's config read
    from the preset or the init checkpoint): each error names the train.parallel field to change."""
    from keye.model.config import preset
    from keye.train.sharded_training import check_parallel

    tiny = preset("tiny")  # 4 experts
    assert check_parallel({"ep": 2, "cp": 2}, 8, tiny)[1] == MeshShape(2, 2, 2)
    with pytest.raises(MeshError, match="ep=8 does not divide the model's 4 experts"):
        check_parallel({"ep": 8}, 8, tiny)
    with pytest.raises(MeshError, match="cp=3 = 3 does not divide the world size 4"):
        check_parallel({"cp": 3}, 4, tiny)
    with pytest.raises(ValueError, match="vit_apart with cp=2"):
        check_parallel({"cp": 2, "vit_apart": True}, 4, tiny)
    block = preset("tiny")
    block.set_attention_mode("dsa")
    block.lm.dsa.selection = "block"
    with pytest.raises(ValueError, match="train.parallel.cp=2 with DSA block selection"):
        check_parallel({"cp": 2}, 2, block)
    assert check_parallel({"ep": 2}, 2, block)[1] == MeshShape(1, 2, 1)  # block selection is fine without cp
