"""The end-of-run summary a person reads: videos ok/rejected (and why), clips, captions, shards, bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keye.core.lineage import AGENT_EVAL_FILE, Lineage


def pipeline_summary(lineage: Lineage, outputs: dict[str, str]) -> dict[str, Any]:
    s: dict[str, Any] = {"artifacts": dict(outputs)}
    if vs := outputs.get("videoset"):
        s.update(lineage.videoset_summary(vs))
    if cs := outputs.get("captionset"):
        counts = lineage.caption_counts(cs)
        s.update(captions_ok=counts.get("ok", 0), captions_failed=counts.get("failed", 0))
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
    if ev := outputs.get("eval"):
        import json

        for row in lineage.evals_of(ev):
            m = json.loads(row["metrics"])
            p = m["primary"]
            s.setdefault("eval", {})[row["bench"]] = {
                "metric": p,
                "value": m[p],
                "chance": (m.get("chance") or {}).get(p),
                "n": m.get("n"),
            }
        s["report"] = str(lineage.workspace.reports / ev / "report.html")
        from keye.eval.heldout import vision_control_path

        control = vision_control_path(lineage.workspace.reports / ev)
        if control.is_file():  # the eval's blank-frame control (keye.eval.heldout.blank_frame_control)
            c = json.loads(control.read_text(encoding="utf-8"))
            s["vision_control"] = str(control)
            s["vision"] = {
                "n": c["real"]["n"],
                "accuracy": c["real"]["accuracy"],
                "chance": c["real"]["chance"],
                "p_value": c["real"]["p_value"],
                "blank_accuracy": c["blank"]["accuracy"],
                "p_real_vs_blank": c["real_vs_blank"]["p_value"],
                "grounding": {
                    name: {
                        "mIoU": g["new_mean"],
                        "blank_mIoU": g["base_mean"],
                        "p_real_vs_blank": g["p_value"],
                    }
                    for name, g in (c.get("grounding") or {}).items()
                },
            }
        comparison = lineage.workspace.reports / ev / "comparison.json"
        if comparison.is_file():  # a post-trained checkpoint vs the one it started from (keye.eval.compare)
            c = json.loads(comparison.read_text(encoding="utf-8"))
            s["comparison"] = {"baseline": c["baseline"], "scores": c["scores"], "path": str(comparison)}
    ag, ck = outputs.get("agent_checkpoint"), outputs.get("checkpoint")
    if ag:
        s["agent_checkpoint_dir"] = ag
    agent = Path(ag or ck).parent / AGENT_EVAL_FILE if (ag or ck) else None
    if (
        agent is not None and agent.is_file()
    ):  # the agent_rl branch (or an agent checkpoint): held-out agent tasks
        import json

        a = json.loads(agent.read_text(encoding="utf-8"))
        s["agent"] = {
            "before": a["before"],
            "after": a["after"],
            "success_gain": a["success_gain"],
            "p_value": float(a["sign_test"]["p_value"]),
            "path": str(agent),
        }
        if w := a.get("rl_over_warmup"):
            s["agent"]["warmup"] = w["before"]
            s["agent"]["rl_over_warmup_p_value"] = float(w["sign_test"]["p_value"])
    if ck:
        s["checkpoint_dir"] = ck
        table = Path(ck).parent / "heldout_table" / "table.json"
        if table.is_file():  # a MOPD student: its per-domain table (keye.eval.domain_table)
            import json

            t = json.loads(table.read_text(encoding="utf-8"))
            s["domain_table"] = {
                "rows": t["rows"],
                "checks": t["checks"],
                "goal": t["goal"],
                "forgetting": t.get("forgetting", {}),
                "forgets_less": t.get("forgets_less", {}),
                "path": str(table),
            }
    return s


HEADLINE_COUNTS = (
    "videos_ok",
    "videos_rejected",
    "clips",
    "captions_ok",
    "captions_failed",
    "shards",
    "shard_samples",
    "shard_bytes",
    "packs",
    "pack_fill",
    "pack_samples",
    "pack_rejected",
)


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers a parent run shows in the runs table and chart view: counts, each held-out score (and its
    chance level), the blank-frame control."""
    out = {k: float(summary[k]) for k in HEADLINE_COUNTS if isinstance(summary.get(k), int | float)}
    for bench, e in (summary.get("eval") or {}).items():
        out[f"{bench}/{e['metric']}"] = float(e["value"])
        if isinstance(e.get("chance"), int | float):
            out[f"{bench}/chance"] = float(e["chance"])
    if c := summary.get("comparison"):
        from keye.eval.compare import comparison_metrics

        out.update(comparison_metrics(c))
    if a := summary.get("agent"):
        for name in ("before", "warmup", "after"):
            for k, v in (a.get(name) or {}).items():
                if k != "n_tasks" and isinstance(v, int | float):
                    out[f"agent/{name}/{k}"] = float(v)
        out["agent/success_gain"] = float(a["success_gain"])
        out["agent/sign_test_p"] = float(a["p_value"])
    if v := summary.get("vision"):
        out["vision/mcq_accuracy"] = float(v["accuracy"])
        out["vision/mcq_chance"] = float(v["chance"])
        out["vision/mcq_blank_accuracy"] = float(v["blank_accuracy"])
        out["vision/mcq_p_real_vs_blank"] = float(v["p_real_vs_blank"])
    return out


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
    if summary.get("checkpoint_dir"):
        lines.append(f"  checkpoint  {summary['checkpoint_dir']}")
    for bench, e in (summary.get("eval") or {}).items():
        chance = f" (chance {e['chance']:.1f})" if isinstance(e.get("chance"), int | float) else ""
        lines.append(
            f"  eval        {bench:<15} {e['metric']} {e['value']:.1f}{chance} on {e['n']} questions"
        )
    if v := summary.get("vision"):
        lines.append(
            f"  mcq pooled  {v['accuracy']:.1f} (chance {v['chance']:.1f}, p {v['p_value']:.2g}) on {v['n']} "
            f"questions; blank frames {v['blank_accuracy']:.1f} (real vs blank p {v['p_real_vs_blank']:.2g})"
        )
        for bench, g in (v.get("grounding") or {}).items():
            lines.append(
                f"  {bench:<11} mIoU {g['mIoU']:.1f}; blank frames {g['blank_mIoU']:.1f} (real vs blank p "
                f"{g['p_real_vs_blank']:.2g})"
            )
    if c := summary.get("comparison"):
        from keye.eval.compare import describe

        lines.append(f"  vs start    {c['baseline']}")
        lines += [f"    {line}" for line in describe(c)]
    if t := summary.get("domain_table"):  # formatted here: importing keye.eval.domain_table would tie every
        # stage's cache key to the model code (summary.py is in each stage's import tree)
        lines.append("  domains     held-out grounding mIoU / MCQ accuracy / caption F1 (chance)")
        for name, r in t["rows"].items():
            cells = " / ".join(
                f"{r[d]:.1f} ({r[d + '_chance']:.1f})" for d in ("grounding", "mcq", "caption")
            )
            lines.append(f"    {name:<20} {cells}")
        for d, c in t["checks"].items():
            verdict = "meets" if c["meets_goal"] else "misses"
            lines.append(
                f"    {d} {c['student_over_chance']:.1f} / {c['specialist_over_chance']:.1f} = "
                f"{100 * c['share']:.0f}% ({verdict} {100 * t['goal']:.0f}%)"
            )
        forgetting = t.get("forgetting", {})
        if forgetting:
            lines.append(
                "    forgetting (points below the best of start and specialist): "
                + ", ".join(f"{n} {v:.1f}" for n, v in forgetting.items())
            )
    if a := summary.get("agent"):
        lines.append("  agent tasks success / tool-call rate / self-correction, held-out, with tools")
        for name in ("before", "warmup", "after"):
            if r := a.get(name):
                label = {"before": "start", "warmup": "warm-up", "after": "agent-RL"}[name]
                kinds = ", ".join(
                    f"{k.removeprefix('success_rate_')} {v:.2f}"
                    for k, v in r.items()
                    if k.startswith("success_rate_")
                )
                lines.append(
                    f"    {label:<10} {r['success_rate']:.3f} / {r['tool_call_rate']:.2f} / "
                    f"{r.get('self_correction_share', float('nan')):.3f} ({kinds}) on {int(r['n_tasks'])} tasks"
                )
        lines.append(f"    gain {a['success_gain']:+.3f}, sign test p {a['p_value']:.2g}")
    if summary.get("report"):
        lines.append(f"  report      {summary['report']}")
    for kind, aid in summary.get("artifacts", {}).items():
        lines.append(f"  {kind:<11} {aid}")
    return "\n".join(lines)


def eval_scores(run: Any) -> dict[str, Any]:
    """{bench: {metric, value, chance, n}} of an eval stage run's output (the flow-run page's score table)."""
    if not run.outputs:
        return {}
    return pipeline_summary(run.lineage, {"eval": run.outputs[0]}).get("eval") or {}
