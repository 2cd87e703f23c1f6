"""The agent_rl stage through the stage protocol on a small pipeline (4 synthetic videos, two 2-step recipes, two
agent GRPO steps): real Prefect flow runs, PyAV, DuckDB, MLflow. The agent-RL checkpoint is recorded with its
inputs, its trajectories are MLflow artifacts, the held-out comparison is in its meta, and a second run makes
nothing again."""

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
            name: agenttest
            workspace: {tmp_path / "ws"}
            stages: [ingest, caption, shard, pack, train, agent_rl, eval]
            sources:
              - {{kind: synthetic, n_videos: 4, n_long: 0, seed: 1, heldout_fraction: 0.5}}
            ingest: {{max_clip_seconds: 6}}
            shard: {{max_side: 112, fps: 4}}
            sampling: {{fps: 1.0, max_frames: 4, min_tokens_per_frame: 4, max_tokens_per_frame: 8,
                        total_token_budget: 64, duration_scaling: false}}
            pack: {{tokenizer: {{vocab_size: 512}}}}
            train:
              preset: tiny
              stages:
                - {{name: align, kind: align, steps: 2, lr: 1.0e-3, warmup_steps: 1, tokens_per_step: 2048}}
                - {{name: sft, kind: sft, steps: 2, lr: 1.0e-3, warmup_steps: 1, tokens_per_step: 2048}}
            agent_rl: {{steps: 2, lr: 1.0e-3, tasks_per_step: 2, save_every: 1, group_size: 2, max_new_tokens: 8,
                        max_response_tokens: 64, max_turns: 2, micro_batch_size: 4, eval_limit: 4,
                        warmup_steps: 2, warmup_lr: 1.0e-3}}
            eval: {{limit: 4, blank_control: false}}
            runner: {{kind: thread, max_workers: 2}}
            """
        )
    )
    return p


def test_agent_rl_stage_then_a_rerun_that_makes_nothing(tmp_path):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from keye.core.lineage import Lineage
    from keye.stages.summary import render

    cfg = _config(tmp_path)
    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import pipeline

        first = pipeline(config_path=str(cfg))
        store = Lineage(tmp_path / "ws", read_only=True)
        before = (
            store.scalar("SELECT count(*) FROM artifacts"),
            store.scalar("SELECT count(*) FROM checkpoints"),
        )
        del store
        second = pipeline(config_path=str(cfg))

    final = Path(first["artifacts"]["agent_checkpoint"])  # a branch: the eval scored the SFT mainline
    assert (
        final.name == "final" and (final / "tokenizer.json").is_file() and (final / "config.json").is_file()
    )
    assert second["artifacts"] == first["artifacts"]
    out = final.parent
    assert sorted(p.name for p in (out / "trajectories").glob("*.parquet")) == [
        "step-000001.parquet",
        "step-000002.parquet",
    ]
    train_tasks = (out / "tasks" / "train.jsonl").read_text().splitlines()
    assert train_tasks and {json.loads(t)["kind"] for t in train_tasks} <= {"frames", "search", "python"}
    comparison = json.loads((out / "agent_eval.json").read_text())
    assert (
        set(comparison["before"]) >= {"success_rate", "tool_call_rate"}
        and "p_value" in comparison["sign_test"]
    )
    store = Lineage(tmp_path / "ws", read_only=True)
    assert (
        store.scalar("SELECT count(*) FROM artifacts"),
        store.scalar("SELECT count(*) FROM checkpoints"),
    ) == before
    row = store.query("SELECT stage, step, meta FROM checkpoints WHERE stage = 'agent_rl'")
    assert [(r["stage"], r["step"]) for r in row] == [("agent_rl", 2)]
    meta = json.loads(row[0]["meta"])
    assert {"heldout_success_rate_after", "heldout_sign_test_p", "tool_call_rate", "reward_mean"} <= set(meta)
    assert {"heldout_success_rate_warmup", "heldout_rl_over_warmup_sign_test_p"} <= set(meta)
    assert (out / "warmup" / "config.json").is_file() and "rl_over_warmup" in comparison
    ck = store.query("SELECT artifact_id FROM artifacts WHERE kind = 'training' AND name = 'agent_rl'")[0]
    ups = {r["id"] for r in store.upstream(ck["artifact_id"])}
    assert first["artifacts"]["videoset"] in ups

    # the held-out agent comparison in the run summary, the eval's report and MLflow (stage run and parent run)
    agent = first["agent"]
    assert agent["after"] == comparison["after"] and agent["warmup"] == comparison["rl_over_warmup"]["before"]
    assert agent["p_value"] == comparison["sign_test"]["p_value"]
    assert "agent tasks" in render(first) and f"sign test p {agent['p_value']:.2g}" in render(first)
    page = Path(first["report"]).read_text()
    assert "Agent tasks with tools (agent_rl)" in page and "agent-RL vs its warm-up" in page
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if "agent/sign_test_p" in r.data.metrics]
    assert parent and parent[0].data.metrics["agent/after/success_rate"] == agent["after"]["success_rate"]
    stage = [r for r in runs if r.info.run_name == "agent_rl" and "heldout_sign_test_p" in r.data.metrics]
    assert stage and stage[0].data.metrics["heldout_success_rate_after"] == agent["after"]["success_rate"]
