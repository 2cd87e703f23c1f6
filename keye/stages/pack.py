"""The pack stage: the tokenizer artifact, which shards go in, the PackSet id, packing, lineage rows.

The tokenizer is trained once per ShardSet and settings (or loaded from a local directory) and kept under
<workspace>/tokenizers/<id>; packs reference it by content hash, so a checkpoint can always be traced to the exact
tokenizer its data was packed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.core.atomic import atomic_dir
from keye.core.config import PackSettings, TokenizerSettings
from keye.core.hashing import code_hash, settings_hash
from keye.core.lineage import Lineage, make_id
from keye.data.packing import PackBudget, read_pack_index
from keye.data.packset import PackSetResult, pack_shards
from keye.data.samples import corpus_texts
from keye.data.sampling import SamplingPolicy
from keye.data.shard_index import scan_shard
from keye.data.tokenizer import KeyeTokenizer, load_tokenizer, train_bpe
from keye.stages.artifact import StageRun


def shard_map(lineage: Lineage, shardset_id: str) -> dict[str, str]:
    """Shard name (the tar's stem, what the pack index records) -> path."""
    return {Path(r["path"]).stem: r["path"] for r in lineage.shards(shardset_id)}


def ensure_tokenizer(settings: TokenizerSettings, shards: dict[str, str], out_dir: Path) -> KeyeTokenizer:
    """Load the tokenizer saved at out_dir, or build it (local HF dir, or BPE on the shards' texts) and save it."""
    if (out_dir / "tokenizer.json").is_file():
        return load_tokenizer(out_dir)
    if settings.path:
        tok = load_tokenizer(settings.path)
    else:
        records = [rec for name in sorted(shards) for _, rec in scan_shard(shards[name]).records]
        tok = train_bpe(
            corpus_texts(records), vocab_size=settings.vocab_size, min_frequency=settings.min_frequency
        )
    with atomic_dir(out_dir) as tmp:
        tok.save(tmp)
    return tok


def tokenizer_id(shardset_id: str, settings: TokenizerSettings) -> str:
    """A trained BPE depends on the corpus, so also on the prompts' wording (keye.data.prompts)."""
    if settings.path is not None:
        return make_id("t", settings.path, settings.model_dump(mode="json"))
    corpus_code = code_hash("keye.data.samples", "keye.data.prompts", "keye.data.tokenizer", __name__)
    return make_id("t", shardset_id, settings.model_dump(mode="json"), corpus_code)


def budget(settings: PackSettings) -> PackBudget:
    return PackBudget(
        max_tokens=settings.max_tokens,
        max_visual_tokens=settings.max_visual_tokens,
        max_frames=settings.max_frames,
        oversize=settings.oversize,
        min_frames=settings.min_frames,
    )


def pack_rows(
    packset_id: str, shard_ids: dict[str, str], index: Any, max_tokens: int
) -> list[dict[str, Any]]:
    """One lineage row per pack of a pack index (keye.core.lineage.Lineage.record_packs), in pack order."""
    by_pack: dict[Any, list[dict[str, Any]]] = {}
    for r in index.to_pylist():
        by_pack.setdefault(r["pack_id"], []).append(r)
    rows = []
    for pid, members in sorted(by_pack.items()):
        tokens = sum(int(m["tokens"]) for m in members)
        rows.append(
            {
                "pack_id": make_id("p", packset_id, pid),
                "n_samples": len(members),
                "tokens": tokens,
                "fill": tokens / max_tokens,
                "shard_ids": [shard_ids[s] for s in sorted({m["shard"] for m in members})],
            }
        )
    return rows


def task_pack_index(
    packset_dir: Path,
    tasks: list[str] | None,
    shards: dict[str, str],
    tok: KeyeTokenizer,
    policy: Any,
    settings: PackSettings,
) -> Path:
    """The pack index of a training stage: the PackSet's own, or (a stage that trains only some tasks) the same
    shards re-packed with just those tasks, so no step is spent on packs that carry no loss. Cached beside it."""
    if not tasks or set(tasks) >= set(settings.tasks):
        return packset_dir / "packs.parquet"
    sub = packset_dir / ("tasks-" + "-".join(sorted(tasks)))
    if not (sub / "packs.parquet").is_file():
        pack_shards(
            shards,
            tok,
            policy,
            budget(settings),
            sub,
            tasks=sorted(tasks),
            seed=settings.seed,
            split="train",
            mcq_orders=settings.mcq_orders,
            mcq_answer=settings.mcq_answer,
            mcq_turns=settings.mcq_turns,
            grounding_answer=settings.grounding_answer,
            grounding_windows=settings.grounding_windows,
        )
    return sub / "packs.parquet"


# -- the stage: plan (tokenizer, PackSet id), pack, record, finish --------------------------------------------------
@dataclass
class PackPlan:
    packset_id: str
    build: bool  # False: a previous run completed this PackSet
    shardset_id: str
    shards: dict[str, str]
    tokenizer: KeyeTokenizer
    tokenizer_dir: Path
    out_dir: Path
    settings: PackSettings
    policy: SamplingPolicy


def plan(run: StageRun, shardset_id: str | None) -> PackPlan:
    s = run.config.pack
    shardset_id = run.input("shardset", shardset_id)
    shards = shard_map(run.lineage, shardset_id)
    tok_id = tokenizer_id(shardset_id, s.tokenizer)
    tok_dir = run.workspace.root / "tokenizers" / tok_id
    tok = ensure_tokenizer(s.tokenizer, shards, tok_dir)
    if run.produce(tok_id, "tokenizer", tok.source, s.tokenizer, [shardset_id], str(tok_dir), output=False):
        run.lineage.complete_artifact(tok_id, sha256=tok.content_hash(), meta={"vocab_size": len(tok)})
    key = settings_hash(s, run.config.sampling.model_dump(mode="json"))
    ps_id = run.key("ps", shardset_id, tok.content_hash(), key)
    out_dir = run.workspace.packs / ps_id
    build = run.produce(ps_id, "packset", "packs", key, [shardset_id, tok_id], path=str(out_dir))
    return PackPlan(ps_id, build, shardset_id, shards, tok, tok_dir, out_dir, s, run.config.sampling)


def pack(plan: PackPlan) -> PackSetResult:
    """Task samples of every shard, packed best-fit to the budget; the index is <out_dir>/packs.parquet."""
    s = plan.settings
    return pack_shards(
        plan.shards,
        plan.tokenizer,
        plan.policy,
        budget(s),
        plan.out_dir,
        tasks=s.tasks,
        seed=s.seed,
        split="train",
        mcq_orders=s.mcq_orders,
        mcq_answer=s.mcq_answer,
        mcq_turns=s.mcq_turns,
        grounding_answer=s.grounding_answer,
        grounding_windows=s.grounding_windows,
    )


def record(run: StageRun, plan: PackPlan, result: PackSetResult) -> None:
    shard_ids = {Path(r["path"]).stem: r["shard_id"] for r in run.lineage.shards(plan.shardset_id)}
    rows = pack_rows(plan.packset_id, shard_ids, read_pack_index(result.index_path), plan.settings.max_tokens)
    run.lineage.record_packs(plan.packset_id, rows)
    stats = {k: v for k, v in result.stats.items() if not isinstance(v, dict | list)}
    meta = {
        **stats,
        "tokenizer_dir": str(plan.tokenizer_dir),
        "bad_records": [list(b) for b in result.bad_records],
    }
    run.lineage.complete_artifact(plan.packset_id, members=[r["pack_id"] for r in rows], meta=meta)
    run.tracker.log_dict(result.stats, "pack_stats.json")


def finish(run: StageRun, plan: PackPlan) -> str:
    run.numbers(run.meta(plan.packset_id))
    return plan.packset_id
