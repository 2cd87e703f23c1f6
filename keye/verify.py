"""`keye verify`: re-hash what lineage says was written, so silent corruption or a swapped file is caught."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keye.core.lineage import Lineage


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)


def verify_workspace(workspace: str | Path) -> VerifyReport:
    from keye.data.shards import verify_shard

    store = Lineage(workspace, read_only=True)
    report = VerifyReport()
    for row in store.shards():
        members = store.shard_member_keys(row["shard_id"])
        report.checked += 1
        report.problems += [
            f"shard {row['shard_id']}: {p}"
            for p in verify_shard(row["path"], row["sha256"], expected_keys=members)
        ]
    from keye.checkpoint_audit import checkpoint_problems, step_checkpoint_dirs

    finals = store.hashed_checkpoints()
    for row in finals:
        report.checked += 1
        report.problems += [
            f"checkpoint {row['checkpoint_id']}: {p}" for p in checkpoint_problems(row["path"], row["sha256"])
        ]
    for step in step_checkpoint_dirs(store.workspace.checkpoints, [r["path"] for r in finals]):
        report.checked += 1
        report.problems += [f"step checkpoint {step.name}: {p}" for p in checkpoint_problems(step)]
    return report
