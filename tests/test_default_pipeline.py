"""Every stage chained by the pipeline flow, as `keye run` does it, on a small config: ingest -> caption -> shard ->
pack -> train (all six recipe kinds, a few steps each) -> eval; the eval report's numbers equal a re-score of the
saved predictions by `keye eval score`, and lineage walks from the final checkpoint back to the source videos."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_all_stages_end_with_a_rescorable_report(tmp_path):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from keye.cli import app
    from keye.lineage import Lineage

    stages = "\n".join(
        f"    - {{name: {k}, kind: {k}, steps: 2, lr: 1.0e-3, tokens_per_step: 1024}}"
        for k in ("align", "pretrain", "multitask", "long_warmup", "long_sparse", "sft")
    )
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            name: smoke
            workspace: {tmp_path / "ws"}
            sources: [{{kind: synthetic, n_videos: 6, n_long: 0, seed: 5}}]
            ingest: {{max_clip_seconds: 30}}
            shard: {{max_side: 112, fps: 4}}
            sampling: {{fps: 1.0, min_frames: 2, max_frames: 4, min_tokens_per_frame: 4, max_tokens_per_frame: 4,
                        total_token_budget: 16, duration_scaling: false}}
            pack: {{max_tokens: 1024, tokenizer: {{vocab_size: 600}}}}
            eval: {{limit: 4, max_new_tokens: 12}}
            """
        )
        + "train:\n  stages:\n"
        + stages
        + "\n"
    )
    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import pipeline

        summary = pipeline(config_path=str(cfg))
    ws = tmp_path / "ws"
    store = Lineage(ws, read_only=True)
    assert summary["videos_ok"] == 6 and summary["packs"] >= 1
    assert {r["name"] for r in store.query("SELECT name FROM runs WHERE kind = 'stage'")} >= {
        "ingest",
        "caption",
        "shard",
        "pack",
        "eval",
        *(f"train:{k}" for k in ("align", "sft")),
    }
    assert Path(summary["report"]).is_file()

    # the report's numbers are a re-score of the saved predictions
    evals = store.evals_of(summary["artifacts"]["eval"])
    assert evals
    runner = CliRunner()
    for row in evals:
        saved = json.loads(row["metrics"])
        args = ["eval", "score", "--bench", saved["_bench"], "--predictions", saved["_predictions"]]
        res = runner.invoke(app, [*args, "--kind", saved["kind"], "--limit", "4"])
        assert res.exit_code == 0, res.output
        again = json.loads(res.output)
        assert again == {k: v for k, v in saved.items() if not k.startswith("_")}

    # lineage: the final checkpoint comes from the source videos; MLflow has the registered version
    final = summary["checkpoint_dir"]
    up = {r["kind"] for r in store.upstream(final)}
    assert {"video", "clip", "shard", "pack", "packset"} <= up or {"video", "shard", "packset"} <= up
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    assert client.get_model_version_by_alias("keye", "best").version


# Issue 6's "must show": the DEFAULT pipeline's SFT model beats chance on the held-out synthetic MCQs. Measured
# (docs/TRAINING.md "Held-out MCQs vs chance"): it does not yet, so this test is expected to fail; strict, so the day
# it passes the suite says so and the marker comes off.
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,  # an error elsewhere still fails the test
    reason="issue 6 open: the tiny default model does not beat chance on held-out MCQs (docs/TRAINING.md)",
)
def test_default_pipeline_beats_chance_on_heldout_mcqs(tmp_path):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from keye.eval.stage import pooled_mcq_significance
    from keye.lineage import Lineage

    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import pipeline

        summary = pipeline(config_path=str(ROOT / "pipelines.yaml"), workspace=str(tmp_path / "ws"))
    store = Lineage(tmp_path / "ws", read_only=True)
    results = {r["bench"]: json.loads(r["metrics"]) for r in store.evals_of(summary["artifacts"]["eval"])}
    pooled = pooled_mcq_significance(results)  # Video-MME (4 options) + Video-MME-v2 (8): each question once
    assert pooled["n"] >= 40, pooled
    # one-sided exact test against guessing, and above every constant-letter answerer (always-A, always-B, ...)
    assert pooled["p_value"] < 0.01, pooled
    assert pooled["accuracy"] > pooled["best_constant_accuracy"], pooled
    for kind in ("videomme", "longvideobench"):
        assert results[kind]["accuracy"] > results[kind]["chance"]["accuracy"], (kind, results[kind])
