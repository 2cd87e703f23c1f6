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
        members = [
            r["key"]
            for r in store.query("SELECT key FROM shard_members WHERE shard_id = ?", [row["shard_id"]])
        ]
        report.checked += 1
        report.problems += [
            f"shard {row['shard_id']}: {p}"
            for p in verify_shard(row["path"], row["sha256"], expected_keys=sorted(members))
        ]
    for row in store.query("SELECT checkpoint_id, path, sha256 FROM checkpoints WHERE sha256 IS NOT NULL"):
        from keye.core.hashing import hash_checkpoint_dir

        report.checked += 1
        p = Path(row["path"])
        if not p.exists():
            report.problems.append(f"checkpoint {row['checkpoint_id']}: {p} is missing")
        elif hash_checkpoint_dir(p) != row["sha256"]:
            report.problems.append(
                f"checkpoint {row['checkpoint_id']}: {p} does not match its recorded sha256"
            )
    return report
