"""The data files a stage run read or wrote, as tables for MLflow's Dataset column: the pack index (pack and train
runs) and the held-out benchmark files (eval runs), each named with the lineage id of the artifact it belongs to,
so the MLflow UI and `keye lineage <id>` point at the same thing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from keye.core.lineage import Lineage
from keye.core.tracking import DatasetSpec
from keye.core.workspace import Workspace

PACK_INDEX = "packs.parquet"


def read_table(path: Path) -> pd.DataFrame:
    """A Parquet file, or a JSON file holding records (a list, or an object keyed by id), as a flat table: nested values
    become JSON strings so the table can be hashed and previewed."""
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            data = [{"id": k, **v} for k, v in data.items()]  # {video: record}, as TimeLens files are
        elif isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        frame = pd.DataFrame(data)
    for col in frame.columns:
        if frame[col].map(lambda v: isinstance(v, dict | list | tuple) or hasattr(v, "tolist")).any():
            frame[col] = frame[col].map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else v))
    return frame


def stage_datasets(
    lineage: Lineage, workspace: Workspace, stage: str, inputs: list[str], outputs: list[str]
) -> list[DatasetSpec]:
    """What to show as datasets for one stage run; files that are not there are left out."""
    out: list[DatasetSpec] = []
    if stage in ("pack", "train"):
        ids = outputs if stage == "pack" else inputs
        context = "output" if stage == "pack" else "training"
        for aid in ids:
            art = lineage.artifact(aid)
            path = workspace.packs / aid / PACK_INDEX
            if art and art["kind"] == "packset" and path.is_file():
                out.append(DatasetSpec(path, f"pack-index-{aid}", aid, context, read_table(path)))
    if stage == "eval":
        for aid in outputs:
            for row in lineage.evals_of(aid):
                bench = json.loads(row["metrics"]).get("_bench")
                if bench and Path(bench).is_file():
                    name = f"heldout-{row['bench']}-{aid}"
                    out.append(DatasetSpec(Path(bench), name, aid, "evaluation", read_table(Path(bench))))
    return out
