"""The pack stage around keye.data.samples/packing: the tokenizer artifact, which shards go in, lineage rows.

The tokenizer is trained once per ShardSet and settings (or loaded from a local directory) and kept under
<workspace>/tokenizers/<id>; packs reference it by content hash, so a checkpoint can always be traced to the exact
tokenizer its data was packed with.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from keye.core.config import PackSettings, TokenizerSettings
from keye.core.hashing import code_hash
from keye.core.lineage import Lineage, make_id
from keye.data.packing import PackBudget
from keye.data.samples import corpus_texts, scan_shard
from keye.data.tokenizer import KeyeTokenizer, load_tokenizer, train_bpe


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
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    tmp.replace(out_dir)
    return tok


def tokenizer_id(shardset_id: str, settings: TokenizerSettings) -> str:
    """A trained BPE depends on the corpus, so also on the prompts' wording (keye.data.prompts)."""
    if settings.path is not None:
        return make_id("t", settings.path, settings.model_dump(mode="json"))
    corpus_code = code_hash("keye.data.samples", "keye.data.prompts")
    return make_id("t", shardset_id, settings.model_dump(mode="json"), corpus_code)


def budget(settings: PackSettings) -> PackBudget:
    return PackBudget(
        max_tokens=settings.max_tokens,
        max_visual_tokens=settings.max_visual_tokens,
        max_frames=settings.max_frames,
        oversize=settings.oversize,
        min_frames=settings.min_frames,
    )


def record_packs(
    lineage: Lineage, packset_id: str, shardset_id: str, shards: dict[str, str], index: Any, max_tokens: int
) -> list[str]:
    """packs -> shards edges and one row per pack; returns the pack ids."""
    rows = index.to_pylist()
    by_pack: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by_pack.setdefault(r["pack_id"], []).append(r)
    shard_ids = {Path(s["path"]).stem: s["shard_id"] for s in lineage.shards(shardset_id)}
    pack_ids = []
    with lineage.transaction() as con:
        for pid, members in sorted(by_pack.items()):
            pack_id = make_id("p", packset_id, pid)
            pack_ids.append(pack_id)
            tokens = sum(int(m["tokens"]) for m in members)
            con.execute(
                "INSERT OR REPLACE INTO packs VALUES (?, ?, ?, ?, ?, NULL)",
                [pack_id, packset_id, len(members), tokens, tokens / max_tokens],
            )
            for shard in sorted({m["shard"] for m in members}):
                con.execute(
                    "INSERT OR IGNORE INTO edges VALUES (?, ?, 'packed_into')", [shard_ids[shard], pack_id]
                )
            con.execute("INSERT OR IGNORE INTO edges VALUES (?, ?, 'part_of')", [pack_id, packset_id])
    return pack_ids


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
    from keye.data.samples import pack_shards

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
        )
    return sub / "packs.parquet"
