"""The video_rl, specialists, mopd and eval stages through the stage protocol on a tiny pipeline (4 synthetic videos,
2-step recipes): real Prefect flow runs, DuckDB lineage, MLflow. The TeacherSet names a specialist per domain, each
with edges from the SFT checkpoint and its data (the grounding one is the video_rl checkpoint, not trained twice), and
the sequential baseline; the MOPD student starts from the SFT checkpoint and has edges from every teacher; MLflow
holds the per-domain curves; the held-out table adds the eval's probe videos; the eval compares the student with its
SFT start; a second run makes nothing again."""

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
            name: mopdtest
            workspace: {tmp_path / "ws"}
            stages: [ingest, caption, shard, pack, train, video_rl, specialists, mopd, eval]
            sources:
              - {{kind: synthetic, n_videos: 4, n_long: 0, seed: 1, heldout_fraction: 0.25}}
            ingest: {{max_clip_seconds: 6}}
            shard: {{max_side: 112, fps: 4}}
            pack: {{tokenizer: {{vocab_size: 512}}}}
            train:
              preset: tiny
              stages:
                - {{name: sft, kind: sft, steps: 2, lr: 1.0e-3, warmup_steps: 1, tokens_per_step: 2048}}
            video_rl: {{steps: 2, prompts_per_step: 2, group_size: 2, max_new_tokens: 4, save_every: 1}}
            specialists:
              steps: 2
              prompts_per_step: 2
              group_size: 2
              max_new_tokens: 4
              save_every: 1
              sft_steps: 2
              sft_tokens_per_step: 2048
              domains:
                grounding: {{kinds: [timelens], rewards: {{time_r1: 1.0}}, method: video_rl}}
                mcq: {{kinds: [videomme], rewards: {{mcq: 1.0}}}}
                caption: {{kinds: [caption], rewards: {{caption_f1: 1.0}}, method: sft}}
              sequential: [grounding, mcq]
            mopd:
              steps: 2
              prompts_per_step: 2
              group_size: 2
              max_new_tokens: 4
              kinds: [timelens, videomme, caption]
              teachers:
                grounding: {{source: specialist}}
                mcq: {{source: specialist}}
                caption: {{source: specialist, view: text}}
              table_limit: 4
            eval: {{grounding_probe_videos: 2}}
            runner: {{kind: thread, max_workers: 2}}
            """
        )
    )
    return p


def test_specialists_then_mopd_with_lineage_and_curves(tmp_path):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from keye.core.lineage import Lineage

    cfg = _config(tmp_path)
    with prefect_test_harness(server_startup_timeout=180):
        from flows.pipeline import pipeline

        first = pipeline(config_path=str(cfg))
        store = Lineage(tmp_path / "ws", read_only=True)
        n_ckpt = store.scalar("SELECT count(*) FROM checkpoints")
        del store
        second = pipeline(config_path=str(cfg))

    art = first["artifacts"]
    assert art["teacherset"].startswith("ts") and Path(art["checkpoint"]).name == "final"
    assert second["artifacts"] == art
    store = Lineage(tmp_path / "ws", read_only=True)
    assert store.scalar("SELECT count(*) FROM checkpoints") == n_ckpt
    stages = {r["stage"]: r for r in store.query("SELECT * FROM checkpoints WHERE stage IS NOT NULL")}
    assert set(stages) == {
        "sft", "video_rl", "specialist:mcq", "specialist:caption", "sequential", "mopd"
    }, set(stages)  # fmt: skip
    sft_id, rl_id = stages["sft"]["checkpoint_id"], stages["video_rl"]["checkpoint_id"]
    student_id = stages["mopd"]["checkpoint_id"]
    teacherset = json.loads(store.artifact(art["teacherset"])["meta"])
    assert teacherset["teachers"]["grounding"]["checkpoint_id"] == rl_id  # reused, not trained again
    assert teacherset["parent_id"] == sft_id
    up = {r["id"] for r in store.upstream(student_id)}
    assert rl_id in up
    for d, data in (("mcq", "videoset"), ("caption", "packset")):  # RL on prompts; SFT on packs
        spec_id = stages[f"specialist:{d}"]["checkpoint_id"]
        assert spec_id in up  # an edge from every teacher to the student
        assert {sft_id, art[data]} <= {r["id"] for r in store.upstream(spec_id)}  # data and parent
    seq_up = {r["id"] for r in store.upstream(stages["sequential"]["checkpoint_id"])}
    assert rl_id in seq_up and sft_id in seq_up  # grounding RL, then MCQ RL on that model
    caption_meta = json.loads(store.artifact(stages["specialist:caption"]["checkpoint_id"])["meta"])
    assert caption_meta["method"] == "sft" and caption_meta["steps"] == 2, caption_meta
    student_meta = json.loads(store.artifact(student_id)["meta"])
    assert student_meta["student_id"] == sft_id  # the student starts where its specialists started
    assert sft_id in up and art["teacherset"] in up
    # MLflow: the mopd stage's run holds per-domain curves
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'mopd'"
    )
    assert runs
    keys = set(runs[0].data.metrics)
    for d in ("grounding", "mcq", "caption"):
        assert {f"{d}/reverse_kl", f"{d}/reward", f"{d}/response_length"} <= keys, keys
        steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, f"{d}/reverse_kl")}
        assert {1, 2} <= steps  # one point per MOPD step (the stage summary adds its own at step 0)
    # the per-domain held-out table: start, every specialist, the sequential baseline, student; in the summary,
    # MLflow and beside the student
    table = first["domain_table"]
    assert list(table["rows"]) == [
        "sft", "specialist:caption", "specialist:grounding", "specialist:mcq", "sequential", "mopd"
    ], table["rows"]  # fmt: skip
    n_eval = {  # the eval's grounding queries: the set's held-out ones and the probe's
        r["bench"]: json.loads(r["metrics"])["n"]
        for r in store.query("SELECT bench, metrics FROM evals WHERE bench LIKE 'timelens%'")
    }
    assert n_eval["timelens_probe"] >= 2, n_eval
    for row in table["rows"].values():
        assert 0 <= row["grounding"] <= 100 and 0 <= row["caption"] <= 100, row
        assert row["grounding_n"] == n_eval["timelens"] + n_eval["timelens_probe"], (row, n_eval)
    assert set(table["checks"]) == {"grounding", "mcq", "caption"}
    assert table["checks"]["caption"]["specialist"] == "specialist:caption"
    assert set(table["forgetting"]) == {"mopd", "sequential"} and set(table["forgets_less"]) == {"sequential"}
    assert (Path(art["checkpoint"]).parent / "heldout_table" / "table.md").is_file()
    assert {"table/mopd/grounding", "table/specialist_caption/caption", "table/sft/mcq"} <= keys, keys
    assert {"table/forgetting/sequential", "table/forgets_less_than/sequential"} <= keys, keys
    assert second["domain_table"]["rows"] == table["rows"]  # the second run reuses the stage and its table
    # the eval compares the student with its SFT start (not with a teacher)
    assert Path(first["comparison"]["baseline"]) == Path(stages["sft"]["path"]), first["comparison"]
