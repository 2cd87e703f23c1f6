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
