"""Which checkpoint files of a workspace are damaged, one line per file: what `keye verify` reports for final and
step checkpoints alike (a step checkpoint is what a re-run resumes from, so it is checked as carefully)."""

from __future__ import annotations

from pathlib import Path

from keye.core.hashing import hash_checkpoint_dir
from keye.model import integrity
from keye.train.checkpointing import list_checkpoints


def checkpoint_problems(path: str | Path, recorded_sha256: str | None = None) -> list[str]:
    """Per-file problems of one checkpoint directory against its checksums.json; without one, the directory hash
    recorded in lineage is the only check left (it cannot say which file changed)."""
    p = Path(path)
    if not p.exists():
        return [f"{p} is missing"]
    if (p / integrity.CHECKSUMS).is_file():
        return integrity.problems(p)
    if recorded_sha256 is not None and hash_checkpoint_dir(p) != recorded_sha256:
        return [f"{p} does not match its recorded sha256 (it has no {integrity.CHECKSUMS} naming the file)"]
    if recorded_sha256 is None:
        return integrity.problems(p)  # says the record is missing
    return []


def step_checkpoint_dirs(workspace_checkpoints: Path, final_dirs: list[str | Path]) -> list[Path]:
    """Complete step checkpoints beside the recorded final checkpoints and under <workspace>/checkpoints."""
    roots = {Path(f).parent for f in final_dirs}
    if workspace_checkpoints.is_dir():
        roots |= {d for d in workspace_checkpoints.iterdir() if d.is_dir()}
    return sorted({step for root in roots for _, step in list_checkpoints(root)})
