"""Tiny packed corpus for the training tests (built once per session from tests/unit/data/test_loader.py's helpers), and
a check that it is what the trainer expects."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from keye.data.packing import PackBudget
from keye.data.packset import pack_shards
from keye.data.samples import corpus_texts
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import train_bpe

POLICY = SamplingPolicy(
    fps=2.0,
    min_frames=2,
    max_frames=4,
    min_tokens_per_frame=4,
    max_tokens_per_frame=4,
    total_token_budget=16,
    duration_scaling=False,
)


def build_corpus(root: Path, n_clips: int = 8, max_tokens: int = 300) -> dict:
    """Shards of tiny synthetic clips -> tokenizer -> pack index; returns the train_stage keywords."""
    from test_loader import _add, _mp4, _record

    root.mkdir(parents=True, exist_ok=True)
    shard_dir = root / "shards"
    shard_dir.mkdir(exist_ok=True)
    records = []
    for s in range(2):
        with tarfile.open(shard_dir / f"shard-{s:06d}.tar", "w") as tar:
            for j in range(n_clips // 2):
                i = s * (n_clips // 2) + j
                key = f"c{i:016x}"
                rec = _record(key, i)
                records.append(rec)
                _add(tar, f"{key}.json", json.dumps(rec).encode())
                _add(tar, f"{key}.mp4", _mp4(i))
    tok = train_bpe(corpus_texts(records), vocab_size=400)
    tok_dir = tok.save(root / "tok")
    shards = {p.name: str(p) for p in sorted(shard_dir.glob("*.tar"))}
    res = pack_shards(
        shards, tok, POLICY, PackBudget(max_tokens=max_tokens, max_frames=8), root / "packs", seed=0
    )
    return {
        "model_preset": "tiny",
        "vocab_size": len(tok),
        "image_token_id": tok.image_id,
        "pack_index": res.index_path,
        "shards": shards,
        "tokenizer_dir": tok_dir,
        "policy": POLICY,
    }


def write_train_spec(corpus: dict, out: Path, settings: dict, **extra: str) -> Path:
    """The JSON spec `python -m keye.train.trainer SPEC` runs: `settings` (StageSettings) on the corpus from
    build_corpus, CPU, checkpoints under `out`; `extra` adds spec keys (e.g. metrics_file). Written beside `out`."""
    spec = {
        "settings": settings,
        "init_checkpoint": None,
        "model_preset": corpus["model_preset"],
        "vocab_size": corpus["vocab_size"],
        "image_token_id": corpus["image_token_id"],
        "pack_index": str(corpus["pack_index"]),
        "shards": corpus["shards"],
        "tokenizer_dir": str(corpus["tokenizer_dir"]),
        "policy": corpus["policy"].model_dump(),
        "out_dir": str(out),
        "device": "cpu",
        **extra,
    }
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_corpus_has_several_packs_and_tasks(train_corpus: dict) -> None:
    from keye.data.packing import read_pack_index

    idx = read_pack_index(train_corpus["pack_index"])
    assert len(set(idx.column("pack_id").to_pylist())) >= 6
    assert {"mcq", "grounding", "caption"} <= set(idx.column("task").to_pylist())
