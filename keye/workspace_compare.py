"""`keye verify --against OTHER`: are two workspaces' artifacts the same bytes, stage by stage?

Why: the same commit, config and seed must give the same artifacts (issue 24). When they do not, the useful answer
is the FIRST artifact that differs in pipeline order (videos -> clips -> captions -> shards -> tokenizer -> packs ->
checkpoints -> eval): everything after it may differ only because of it.

Artifacts are the files a stage writes under the workspace (by path relative to the workspace, sha256 of the
bytes) and, for stages whose output lives in lineage (clip boundaries, captions), one row per id hashed as
canonical JSON. Left out on purpose, because they hold wall-clock times or absolute paths by design: lineage and
MLflow databases, Prefect's home, the human-readable report.md/report.html, the columns path/created_at/... of
lineage rows and timing keys inside their JSON; paths inside the workspace are compared relative to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.determinism import TIMING_KEYS

STAGES: tuple[str, ...] = (
    "videos",
    "clips",
    "captions",
    "shards",
    "tokenizer",
    "packs",
    "checkpoints",
    "eval",
)

# stage -> the workspace folder its files live in
_STAGE_DIRS: dict[str, str] = {
    "videos": "videos",
    "clips": "cache/clips",
    "shards": "shards",
    "tokenizer": "tokenizers",
    "packs": "packs",
    "checkpoints": "checkpoints",
    "eval": "reports",
}
# stage -> (lineage table, id column, the columns that are the artifact; others are paths and times)
_STAGE_ROWS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "videos": (
        "videos",
        "video_id",
        ("sha256", "status", "reason", "duration", "fps", "width", "height", "codec", "bytes"),
    ),
    "clips": ("clips", "clip_id", ("video_id", "idx", "start_s", "end_s", "status", "reason")),
    "captions": (
        "captions",
        "caption_id",
        ("clip_id", "backend", "model", "prompt_version", "status", "reason", "caption", "record"),
    ),
}
_SKIP_SUFFIXES = (".md", ".html", ".tmp", ".partial")


@dataclass(frozen=True)
class Artifact:
    stage: str
    id: str  # "file:<path relative to the workspace>" or "<table>:<row id>"
    location: str  # the file's path, or "<lineage.duckdb> <table> <id>"
    sha256: str


@dataclass
class Difference:
    stage: str
    id: str
    ours: Artifact | None
    theirs: Artifact | None

    def describe(self, ours_ws: Path, theirs_ws: Path) -> str:
        a = f"{self.ours.location}  sha256 {self.ours.sha256}" if self.ours else f"(absent from {ours_ws})"
        b = (
            f"{self.theirs.location}  sha256 {self.theirs.sha256}"
            if self.theirs
            else f"(absent from {theirs_ws})"
        )
        return f"stage {self.stage}: {self.id} differs\n  this:    {a}\n  against: {b}"


@dataclass
class Comparison:
    ours: Path
    theirs: Path
    compared: dict[str, int] = field(default_factory=dict)  # stage -> artifacts compared
    differences: list[Difference] = field(default_factory=list)  # in pipeline order
    missing: list[str] = field(default_factory=list)  # "stage X: ..." where a stage ran in one workspace only

    @property
    def identical(self) -> bool:
        return not self.differences and not self.missing

    @property
    def first(self) -> Difference | None:
        return self.differences[0] if self.differences else None

    def lines(self) -> list[str]:
        """What `keye verify --against` prints."""
        out = []
        first_stage = self.first.stage if self.first else None
        for stage in STAGES:
            n = self.compared.get(stage, 0)
            n_diff = sum(d.stage == stage for d in self.differences)
            miss = [m for m in self.missing if m.startswith(f"stage {stage}:")]
            state = miss[0] if miss else ("not run in either" if not n else f"{n_diff} of {n} differ")
            if not miss and n and not n_diff:
                state = f"{n} identical"
            out.append(f"{stage:<12} {state}")
        if self.first:
            out.append(f"FIRST DIFFERENCE ({first_stage}):")
            out.append(self.first.describe(self.ours, self.theirs))
        return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _canonical(value: Any, root: str) -> Any:
    """A lineage value without wall-clock timings, paths inside the workspace written relative to it."""
    if isinstance(value, dict):
        return {k: _canonical(v, root) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_canonical(v, root) for v in value]
    if isinstance(value, str) and value.startswith(root + "/"):
        return "<workspace>/" + value[len(root) + 1 :]
    return value


def _row_hash(row: dict[str, Any], columns: tuple[str, ...], root: Path) -> str:
    canon = {}
    for c in columns:
        v = row.get(c)
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        canon[c] = _canonical(v, str(root))
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def _files(root: Path, stage: str) -> Iterator[Artifact]:
    base = root / _STAGE_DIRS.get(stage, "")
    if stage not in _STAGE_DIRS or not base.is_dir():
        return
    for p in sorted(base.rglob("*")):
        if p.is_file() and not p.name.endswith(_SKIP_SUFFIXES) and ".tmp-" not in p.name:
            rel = p.relative_to(root).as_posix()
            yield Artifact(stage, f"file:{rel}", str(p), _sha256_file(p))


def _rows(root: Path, stage: str) -> Iterator[Artifact]:
    if stage not in _STAGE_ROWS:
        return
    from keye.core.lineage import Lineage

    table, id_col, columns = _STAGE_ROWS[stage]
    for row in sorted(Lineage(root, read_only=True).table_rows(table), key=lambda r: r[id_col]):
        loc = f"{root / 'lineage.duckdb'} {table} {row[id_col]}"
        yield Artifact(stage, f"{table}:{row[id_col]}", loc, _row_hash(row, columns, root))


def collect(workspace: str | Path) -> dict[str, dict[str, Artifact]]:
    """stage -> artifact id -> Artifact, for one workspace (lineage rows first, then files, each sorted)."""
    from keye.core.lineage import LineageError

    root = Path(workspace).expanduser().resolve()
    if not (root / "lineage.duckdb").is_file():
        raise LineageError(f"{root}: not a keye workspace (no lineage.duckdb); give the --workspace of a run")
    return {stage: {a.id: a for a in [*_rows(root, stage), *_files(root, stage)]} for stage in STAGES}


def compare_workspaces(ours: str | Path, theirs: str | Path) -> Comparison:
    """Every artifact of both workspaces, stage by stage in pipeline order; differences in that order."""
    a_root, b_root = Path(ours).expanduser().resolve(), Path(theirs).expanduser().resolve()
    a, b = collect(a_root), collect(b_root)
    result = Comparison(a_root, b_root)
    for stage in STAGES:
        sa, sb = a[stage], b[stage]
        if bool(sa) != bool(sb):
            have, lack = (a_root, b_root) if sa else (b_root, a_root)
            result.missing.append(
                f"stage {stage}: {len(sa or sb)} artifact(s) in {have}, none in {lack} (the stage did not run there)"
            )
        result.compared[stage] = len(set(sa) | set(sb))
        for key in sorted(
            set(sa) | set(sb), key=lambda k: (not k.startswith(("videos:", "clips:", "captions:")), k)
        ):
            x, y = sa.get(key), sb.get(key)
            if x is None or y is None or x.sha256 != y.sha256:
                result.differences.append(Difference(stage, key, x, y))
    return result
