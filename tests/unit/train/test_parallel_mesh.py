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
