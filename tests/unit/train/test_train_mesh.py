"""The trainer on a mesh (keye.train.sharded_training) over 2 and 4 gloo CPU processes: under FSDP2, EP, CP and the
ViT apart, alone and composed with dp_shard, the first optimizer step's loss, load statistics and every gradient
equal one plain process taking the same global batch (float32 tolerance), on the tiny preset and on a 4-layer
30B-A3B-shaped model (128 experts top-8, GQA 32/4; CPU widths).

One launch per world size runs all of its meshes (tests/unit/train/trainer_worker.py), to keep the cost small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_launch import launch
from dist_worker import shaped_30b_config
from safetensors.torch import load_file
from test_train_data import write_train_spec

from keye.data.packing import read_pack_index
from keye.model import build_model, save_checkpoint
from keye.model.config import preset

WORKER = Path(__file__).with_name("trainer_worker.py")
MESHES = {  # name -> (world, train.parallel)
    "fsdp2": (2, {}),
    "ep2": (2, {"ep": 2}),
    "cp2": (2, {"cp": 2}),
    "vit_apart2": (2, {"vit_apart": True}),
    "dp2_ep2": (4, {"dp_shard": 2, "ep": 2}),
    "dp2_cp2": (4, {"dp_shard": 2, "cp": 2}),
    "ep2_cp2": (4, {"ep": 2, "cp": 2}),
    "vit_apart4_ep2": (4, {"ep": 2, "vit_apart": True}),
}
SHAPED_30B = ("ep2", "cp2", "dp2_ep2", "dp2_cp2")  # the 30B-shaped model under these (the tiny under all)
DSA = (
    "cp2",
    "dp2_cp2",
)  # a DSA stage (tiny, top-16 of up to ~150-row samples: sparse + indexer KL) under these


def _models(name: str) -> tuple[str, ...]:
    return ("tiny", *(("30b",) if name in SHAPED_30B else ()), *(("dsa",) if name in DSA else ()))


def _settings(corpus: dict) -> dict:
    idx = read_pack_index(corpus["pack_index"])
    mean_pack = sum(idx.column("tokens").to_pylist()) / len(set(idx.column("pack_id").to_pylist()))
    # 4 packs per step: 1, 2 or 4 data-parallel ranks take 4, 2 or 1 each
    return {
        "name": "pretrain", "kind": "pretrain", "steps": 1, "lr": 2e-3, "tokens_per_step": int(4 * mean_pack),
        "checkpoint_every": 100, "shuffle": True, "seed": 3, "aux_coef": 0.1,
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(train_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("mesh")
    ck = tmp / "shaped30b"
    cfg = shaped_30b_config(4)
    cfg.lm.vocab_size, cfg.image_token_id = train_corpus["vocab_size"], train_corpus["image_token_id"]
    save_checkpoint(build_model(cfg, seed=0), ck)
    dsa = preset("tiny", train_corpus["vocab_size"], train_corpus["image_token_id"])
    dsa.lm.dsa.topk = 16
    save_checkpoint(build_model(dsa, seed=0), tmp / "tiny_dsa")
    models = {"tiny": None, "30b": str(ck), "dsa": str(tmp / "tiny_dsa")}
    settings = _settings(train_corpus)

    def case(name: str, model: str, parallel: dict | None) -> dict:
        out = tmp / f"{model}-{name}"
        stage = {**settings, "name": "sparse", "kind": "long_sparse"} if model == "dsa" else settings
        spec = write_train_spec(train_corpus, out, stage, init_checkpoint=models[model])
        s = json.loads(spec.read_text())
        if parallel is not None:
            s["parallel"] = parallel
        return {"name": f"{model}/{name}", "spec": s, "grads": str(tmp / f"{model}-{name}.safetensors")}

    results, grads = {}, {}
    plan = {1: [case("one", m, None) for m in models]}  # the plain single-process path
    for name, (world, parallel) in MESHES.items():
        for m in _models(name):
            plan.setdefault(world, []).append(case(name, m, parallel))
    for world, cases in plan.items():
        results.update(launch({"cases": cases}, world, tmp, f"w{world}", worker=WORKER))
        grads.update({c["name"]: c["grads"] for c in cases})
    return {"results": results, "grads": grads}


@pytest.mark.parametrize("case", [f"{m}/{n}" for n in MESHES for m in _models(n)])
def test_mesh_step_equals_one_process(runs: dict, case: str) -> None:
    model = case.split("/")[0]
    one, got = runs["results"][f"{model}/one"], runs["results"][case]
    assert got["packs"] == one["packs"] and len(one["packs"]) == 4  # the same global batch
    assert got["target_tokens"] == one["target_tokens"]
    assert got["lm_loss"] == pytest.approx(one["lm_loss"], rel=1e-5, abs=0)
    assert got["aux_loss"] == pytest.approx(one["aux_loss"], rel=1e-5, abs=0)  # one balance loss per pack
    assert got["expert_counts"] == one["expert_counts"]
    assert got["indexer_loss"] == pytest.approx(one["indexer_loss"], rel=1e-5, abs=0)
    assert (one["indexer_loss"] > 0) == (model == "dsa")  # the DSA stage's KL (each cp rank holds a share)
    g1, g2 = load_file(runs["grads"][f"{model}/one"]), load_file(runs["grads"][case])
    assert sorted(g1) == sorted(g2)
    assert any(k.endswith("w_down") for k in g1) and any(k.startswith("vision.") for k in g1)
    for name in g1:
        scale = float(g1[name].abs().max())
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-12), msg=name)
