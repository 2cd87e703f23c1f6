"""A PackSet from shards as one call: the records of every shard (json only), the sample table with exact token
counts (keye.data.samples), best-fit packing (keye.data.packing), the Parquet files written atomically."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from keye.core.atomic import atomic_path
from keye.data.packing import PackBudget, pack, write_pack_index
from keye.data.samples import TASKS, recounter, sample_table
from keye.data.sampling import SamplingPolicy
from keye.data.shard_index import scan_shard
from keye.data.tokenizer import KeyeTokenizer


@dataclass
class PackSetResult:
    """What the pack stage produced: the Parquet pack index and sample table, stats, and what was left out."""

    index_path: Path
    samples_path: Path
    stats: dict[str, Any]
    bad_records: list[tuple[str, str, str]]  # (shard, key, reason): unreadable shard members
    rejected: pa.Table  # samples the budget rejected, with reasons


def pack_shards(
    shards: Mapping[str, str | os.PathLike[str]],
    tok: KeyeTokenizer,
    policy: SamplingPolicy,
    budget: PackBudget,
    out_dir: str | os.PathLike[str],
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    split: str | None = "train",
    mcq_orders: int = 1,
    mcq_answer: str = "letter",
    mcq_turns: int = 1,
    grounding_answer: str = "exact",
    grounding_windows: int = 0,
) -> PackSetResult:
    """The pack stage as one call (the flow wraps it): read the records of every shard (json only), build the
    sample table with exact token counts, pack with keye.data.packing (cut samples recounted exactly), write
    `samples.parquet` and `packs.parquet` atomically into `out_dir`. `shards` maps shard name -> tar path; the
    names are what the index records (and the loader resolves)."""
    bad: list[tuple[str, str, str]] = []
    records: dict[tuple[str, str], dict[str, Any]] = {}
    ordered: list[tuple[str, dict[str, Any]]] = []
    for name in sorted(shards):
        try:
            sc = scan_shard(shards[name])
        except (OSError, tarfile.TarError) as e:
            bad.append((name, "", f"unreadable shard: {e}"))
            continue
        bad.extend((name, key, why) for key, why in sc.bad)
        for key, rec in sc.records:
            records[(name, key)] = rec
            ordered.append((name, rec))
    table = sample_table(
        ordered,
        tok,
        policy,
        tasks,
        split,
        bad=bad,
        mcq_orders=mcq_orders,
        mcq_answer=mcq_answer,
        mcq_turns=mcq_turns,
        grounding_answer=grounding_answer,
        grounding_windows=grounding_windows,
    )
    result = pack(table, budget, seed=seed, recount=recounter(table, records, tok, policy))
    result.stats["n_bad_records"] = len(bad)
    result.stats["n_records"] = len(records)
    result.stats["tokenizer_sha256"] = tok.content_hash()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "samples.parquet") as tmp:
        pq.write_table(table, tmp)
    index_path = write_pack_index(result, out / "packs.parquet")
    return PackSetResult(index_path, out / "samples.parquet", result.stats, bad, result.rejected)
