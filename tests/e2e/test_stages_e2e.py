"""Every stage through the stage protocol on a small pipeline (4 synthetic videos, two 2-step recipes, a few eval
questions): real Prefect flow runs, PyAV, DuckDB, MLflow. A second run finds every output complete and makes
nothing again: same artifact ids, no new artifact, checkpoint or eval rows."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(
        textwrap.dedent(
            f"""
            name: stagestest
            workspace: {tmp_path / "ws"}
            stages: [ingest, caption, shard, pack, train, video_rl, eval]
            sources:
              - {{kind: synthetic, n_videos: 4, n_long: 0, seed: 1, heldout_fraction: 0.5}}
            ingest: {{max_clip_seconds: 6}}
            shard: {{max_side: 112, fps: 4}}
            pack: {{tokenizer: {{vocab_size: 512}}}}
            train:
              preset: tiny
              stages:
                - {{name: align, kind: align, steps: 2, lr: 1.0e-3, warmup_steps: 1, tokens_per_step: 2048}}
                - {{name: sft, kind: sft, steps: 2, lr: 1.0e-3, warmup_steps: 1, tokens_per_step: 2048}}
            video_rl: {{steps: 2, lr: 1.0e-4, prompts_per_step: 2, group_size: 2, max_new_tokens: 4, grounding_windows: 2,
                        filter_groups: false, save_every: 1, context_rl: {{enabled: false}}}}
            eval: {{limit: 2, max_new_tokens: 4, batch_size: 2, blank_control: false, grounding_probe_videos: 3}}
            runner: {{kind: thread, max_workers: 2}}
            """
        )
    )
    return p


def test_all_stages_then_a_rerun_that_makes_nothing(tmp_path):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from keye.core.lineage import Lineage

    cfg = _config(tmp_path)
    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import pipeline

        first = pipeline(config_path=str(cfg))
        store = Lineage(tmp_path / "ws", read_only=True)
        tables = ("artifacts", "checkpoints", "evals", "packs", "shards", "captions")
        counts = {t: store.scalar(f"SELECT count(*) FROM {t}") for t in tables}
        del store
        second = pipeline(config_path=str(cfg))

    art = first["artifacts"]
    assert set(art) == {"videoset", "captionset", "shardset", "packset", "checkpoint", "eval"}
    assert (
        art["videoset"].startswith("vs") and art["packset"].startswith("ps") and art["eval"].startswith("e")
    )
    assert Path(art["checkpoint"]).name == "final" and (Path(art["checkpoint"]) / "tokenizer.json").is_file()
    assert first["packs"] >= 1 and Path(first["report"]).is_file()
    assert second["artifacts"] == art
    store = Lineage(tmp_path / "ws", read_only=True)
    assert {t: store.scalar(f"SELECT count(*) FROM {t}") for t in tables} == counts
    ckpts = store.query("SELECT stage, step FROM checkpoints WHERE stage IS NOT NULL ORDER BY stage")
    assert [(r["stage"], r["step"]) for r in ckpts] == [("align", 2), ("sft", 2), ("video_rl", 2)]
    # the RL checkpoint walks back to the SFT checkpoint and the VideoSet its prompts came from, and the eval
    # compared it with the SFT checkpoint question by question (both evals recorded)
    rl = store.query("SELECT checkpoint_id FROM checkpoints WHERE stage = 'video_rl'")[0]["checkpoint_id"]
    sft = store.query("SELECT checkpoint_id FROM checkpoints WHERE stage = 'sft'")[0]["checkpoint_id"]
    up = [r["id"] for r in store.upstream(rl)]
    assert sft in up and art["videoset"] in up
    # the RL prompts: each training-split grounding query on its whole video and on up to 2 windows of it
    meta = json.loads(store.query("SELECT meta FROM checkpoints WHERE stage = 'video_rl'")[0]["meta"])
    bench = next(Path(art["checkpoint"]).parent.glob("prompts/set0/timelens/*.json"))
    whole = sum(len(v["queries"]) for v in json.loads(bench.read_text()).values())
    assert whole < meta["prompts"] <= 3 * whole
    assert Path(art["checkpoint"]).parent.name == rl
    comparison = json.loads((Path(first["report"]).parent / "comparison.json").read_text())
    assert comparison["baseline"].endswith("final") and "timelens" in comparison["scores"]
    # the grounding probe: 3 new held-out videos generated once, asked by both evals and paired like the set's own
    probe = sorted((tmp_path / "ws" / "videos").glob("synthetic-*-probe3"))
    assert len(probe) == 1 and len(list(probe[0].glob("evt_*.json"))) == 3
    assert (
        comparison["scores"]["timelens_probe"]["n"] == 2 == first["eval"]["timelens_probe"]["n"]
    )  # eval.limit 2
    assert store.evals_of(comparison["baseline_eval"])  # the SFT checkpoint's eval is recorded
    shas = store.query("SELECT DISTINCT sha256 FROM checkpoints WHERE checkpoint_id IN (?, ?)", [rl, sft])
    # one evaluation per distinct weights (2 RL steps on zero-reward groups may leave the weights as they were)
    assert store.scalar("SELECT count(DISTINCT eval_id) FROM evals") == len(shas)
    assert comparison["identical_weights"] == (len(shas) == 1)
    # the PackSet, the train runs and the eval all name their inputs in lineage
    ck = store.query("SELECT artifact_id FROM artifacts WHERE kind = 'training' AND name = 'sft'")[0][
        "artifact_id"
    ]
    assert art["packset"] in [r["id"] for r in store.upstream(ck)]
