"""The end-of-run summary a person reads: videos ok/rejected (and why), clips, captions, shards, bytes."""

from __future__ import annotations

from typing import Any

from keye.lineage import Lineage


def pipeline_summary(lineage: Lineage, outputs: dict[str, str]) -> dict[str, Any]:
    s: dict[str, Any] = {"artifacts": dict(outputs)}
    if vs := outputs.get("videoset"):
        s.update(lineage.videoset_summary(vs))
    if cs := outputs.get("captionset"):
        from keye.data.captioning import summary

        s.update(summary(lineage, cs))
    if ss := outputs.get("shardset"):
        rows = lineage.shards(ss)
        s.update(
            shards=len(rows),
            shard_samples=sum(r["n_samples"] for r in rows),
            shard_bytes=sum(r["bytes"] for r in rows),
            shard_dir=str(lineage.workspace.shards / ss),
        )
    if ps := outputs.get("packset"):
        import json

        meta = json.loads(lineage.artifact(ps)["meta"] or "{}")
        s.update(
            packs=meta.get("n_packs"),
            pack_fill=meta.get("fill_ratio"),
            pack_samples=meta.get("n_samples"),
            pack_rejected=meta.get("n_rejected"),
        )
    return s


def render(summary: dict[str, Any]) -> str:
    lines = ["Keye pipeline summary"]
    if "videos_ok" in summary:
        lines.append(
            f"  videos      {summary['videos_ok']} ok, {summary['videos_rejected']} rejected"
            f" ({summary.get('seconds_ok', 0) / 60:.1f} min of video)"
        )
        for reason, n in (summary.get("rejections") or {}).items():
            lines.append(f"    rejected x{n}: {reason}")
        lines.append(f"  clips       {summary['clips']}")
    if "captions_ok" in summary:
        lines.append(f"  captions    {summary['captions_ok']} ok, {summary['captions_failed']} failed")
    if "shards" in summary:
        lines.append(
            f"  shards      {summary['shards']} ({summary['shard_samples']} samples, "
            f"{summary['shard_bytes'] / 1e6:.1f} MB) in {summary.get('shard_dir', '')}"
        )
    if summary.get("packs") is not None:
        lines.append(
            f"  packs       {summary['packs']} (fill {100 * (summary.get('pack_fill') or 0):.1f}%, "
            f"{summary.get('pack_samples')} samples, {summary.get('pack_rejected')} rejected)"
        )
    for kind, aid in summary.get("artifacts", {}).items():
        lines.append(f"  {kind:<11} {aid}")
    return "\n".join(lines)
