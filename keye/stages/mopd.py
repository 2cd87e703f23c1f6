"""The mopd stage: the SFT checkpoint as a student that samples its own answers and follows, token by token, the
teacher of each prompt's domain (the specialists, a checkpoint, or an endpoint; video or text view), so one model
keeps every specialist's skill. One checkpoint out, with lineage edges from every teacher to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.core.config import MOPDConfig
from keye.core.hashing import hash_checkpoint_dir, settings_hash
from keye.rl.mopd import MOPDSettings
from keye.rl.mopd_train import MOPDSchedule, TeacherSpec, train_mopd
from keye.rl.rollouts import RolloutPrompt
from keye.stages.artifact import StageRun
from keye.stages.specialists import device_of, training_prompts, videoset_videos


@dataclass
class MOPDPlan:
    checkpoint_id: str
    build: bool
    student: str
    student_id: str
    videoset_id: str
    out_dir: Path
    teacherset_id: str | None = None
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    teacher_ids: dict[str, str] = field(default_factory=dict)  # domain -> lineage id (checkpoints only)


def settings(s: MOPDConfig) -> MOPDSettings:
    return MOPDSettings(
        group_size=s.group_size,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        alpha=s.alpha,
        eps_low=s.eps_low,
        eps_high=s.eps_high,
        loss_agg_mode=s.loss_agg_mode,
        full_vocab_kl=s.full_vocab_kl,
        micro_batch_size=s.micro_batch_size,
        domains=tuple(sorted(s.teachers)),
        teacher_sampled=dict(s.teacher_sampled),
    )


def _teachers(run: StageRun, teacherset_id: str | None) -> tuple[dict[str, TeacherSpec], dict[str, str], str]:
    """The routing table resolved: domain -> TeacherSpec, domain -> lineage id, and a key of their contents."""
    s = run.config.mopd
    specs: dict[str, TeacherSpec] = {}
    ids: dict[str, str] = {}
    keys: list[Any] = []
    specialists = run.meta(teacherset_id)["teachers"] if teacherset_id else {}
    for domain, t in sorted(s.teachers.items()):
        if t.source == "specialist":
            if domain not in specialists:
                raise ValueError(
                    f"mopd.teachers.{domain}: source 'specialist' but the TeacherSet {teacherset_id} has "
                    f"{sorted(specialists)}; add the domain to specialists.domains or give a checkpoint"
                )
            path, ids[domain] = specialists[domain]["path"], specialists[domain]["checkpoint_id"]
        elif t.source.startswith(("http://", "https://")):
            specs[domain] = TeacherSpec(base_url=t.source, model=t.served_model, view=t.view)
            keys.append((domain, t.source, t.served_model, t.view))
            continue
        else:
            path = t.source
            ids[domain] = run.lineage.checkpoint_id_for(path, hash_checkpoint_dir(path))
        specs[domain] = TeacherSpec(checkpoint=str(path), view=t.view)
        keys.append((domain, ids[domain], t.view))
    return specs, ids, settings_hash(keys)


def plan(
    run: StageRun, checkpoint_dir: str | None, teacherset_id: str | None, videoset_id: str | None
) -> MOPDPlan:
    """Run alone: the newest TeacherSet (when a teacher is a specialist) and its parent as the student."""
    s = run.config.mopd
    needs_set = any(t.source == "specialist" for t in s.teachers.values())
    teacherset_id = run.input("teacherset", teacherset_id) if needs_set else None
    # the student starts where its specialists started (the pipeline passes video_rl's output on, which is a
    # teacher here, not the student)
    student = run.meta(teacherset_id)["parent"] if teacherset_id else None
    student = student or checkpoint_dir or run.lineage.latest_checkpoint_path()
    sha = hash_checkpoint_dir(student)
    student_id = run.lineage.checkpoint_id_for(student, sha)
    videoset_id = run.input("videoset", videoset_id)
    specs, ids, teachers_key = _teachers(run, teacherset_id)
    ck = run.key("mo", sha, teachers_key, videoset_id, settings_hash(s), run.config.seed)
    out_dir = run.workspace.checkpoints / ck
    inputs = [student_id, *ids.values(), videoset_id] + ([teacherset_id] if teacherset_id else [])
    build = run.produce(ck, "training", "mopd", s, inputs, path=str(out_dir))
    return MOPDPlan(ck, build, str(student), student_id, videoset_id, out_dir, teacherset_id, specs, ids)


def train(run: StageRun, plan: MOPDPlan) -> None:
    """Distil (resuming from step checkpoints); MLflow gets "<domain>/reverse_kl", "<domain>/reward",
    "<domain>/response_length" per step; lineage gets the student and every teacher as inputs of the result."""
    s, lineage = run.config.mopd, run.lineage
    prompts = training_prompts(run, plan.videoset_id, plan.out_dir / "prompts", s.kinds)
    if s.balance_domains:
        prompts = balanced(prompts)
    result = train_mopd(
        plan.student,
        plan.teachers,
        prompts,
        plan.out_dir,
        MOPDSchedule(
            steps=s.steps,
            lr=s.lr,
            warmup_steps=s.warmup_steps,
            prompts_per_step=s.prompts_per_step,
            save_every=s.save_every,
            seed=run.config.seed if s.seed is None else s.seed,
        ),
        settings(s),
        s.rewards,
        device=device_of(run, s.device),
        log_metrics=run.tracker.log_metrics,
    )
    table = heldout_table(run, plan, str(result.checkpoint_dir)) if s.heldout_table else {}
    sha = hash_checkpoint_dir(result.checkpoint_dir)
    meta = {
        "steps": result.steps,
        "student": plan.student,
        "student_id": plan.student_id,
        "prompts": len(prompts),
        "teachers": plan.teacher_ids,
        **result.metrics,
        **table,
    }
    path = str(result.checkpoint_dir.resolve())
    teachers = set(plan.teacher_ids.values())
    inputs = [i for i in run.inputs if i not in teachers]
    lineage.record_checkpoint(
        plan.checkpoint_id,
        path,
        sha,
        "mopd",
        result.steps,
        run.run_id,
        inputs,
        meta,
        teachers=sorted(teachers),
    )
    lineage.complete_artifact(plan.checkpoint_id, sha256=sha, meta=meta)


def table_videos(run: StageRun, videoset_id: str) -> list[str]:
    """The VideoSet's videos and, when the eval has a grounding probe, its new held-out videos (generated once per
    workspace, shared with the eval): a table of a few dozen held-out videos cannot tell the rows apart."""
    from keye.stages.sources import materialise_probe

    videos = videoset_videos(run, videoset_id)
    n, src = run.config.eval.grounding_probe_videos, run.config.synthetic_source()
    if n and src is not None:
        probe = materialise_probe(src, n, run.workspace)
        videos += sorted(
            str(f)
            for f in probe.iterdir()
            if f.suffix != ".json" and not f.name.startswith(".") and f.with_suffix(".json").is_file()
        )
    return videos


def balanced(prompts: list[RolloutPrompt]) -> list[RolloutPrompt]:
    """Every domain's prompts repeated up to the largest domain's count (repeats get their own ids), in domain
    order; the training loop shuffles them."""
    by: dict[str, list[RolloutPrompt]] = {}
    for p in prompts:
        by.setdefault(p.reference["domain"], []).append(p)
    most = max((len(v) for v in by.values()), default=0)
    return [
        p if i < len(mine) else RolloutPrompt(p.messages, p.reference, f"{p.id}#{i // len(mine)}")
        for _, mine in sorted(by.items())
        for i, p in enumerate(mine[j % len(mine)] for j in range(most))
    ]


def heldout_table(run: StageRun, plan: MOPDPlan, student_dir: str) -> dict[str, float]:
    """The per-domain held-out table (start, each checkpoint specialist, the sequential baseline, student) on the
    held-out videos; written beside the student (heldout_table/table.json, table.md) and to MLflow; returns its flat
    numbers."""
    import json

    from keye.core.atomic import atomic_dir
    from keye.data.frame_cache import FrameCache
    from keye.eval import domain_table as dt

    s = run.config.mopd
    videos = table_videos(run, plan.videoset_id)
    names = {"sft": plan.student}
    specialists = {}
    for d, t in sorted(plan.teachers.items()):
        if t.checkpoint is not None:  # an endpoint teacher is not scored here (its view may not be video)
            names[f"specialist:{d}"] = t.checkpoint
            specialists[d] = f"specialist:{d}"
    baselines = run.meta(plan.teacherset_id).get("baselines", {}) if plan.teacherset_id else {}
    for name, b in sorted(baselines.items()):
        names[name] = b["path"]
    names["mopd"] = student_dir
    final = plan.out_dir / "heldout_table"
    frames = FrameCache(max_bytes=1 << 30)  # every row asks the same videos: decode each once
    with atomic_dir(final) as tmp:
        device, limit, batch = device_of(run, s.device), s.table_limit, run.config.eval.batch_size
        rows = {
            n: dt.score_domains(
                ck,
                videos,
                tmp / n.replace(":", "-"),
                device=device,
                batch_size=batch,
                limit=limit,
                frames_cache=frames,
            )  # fmt: skip
            for n, ck in names.items()
        }
        table = dt.domain_table(rows, specialists, student="mopd", start="sft", baselines=sorted(baselines))
        (tmp / "table.json").write_text(json.dumps(table, indent=1, default=float))
        (tmp / "table.md").write_text(dt.markdown(table))
    run.tracker.log_dict(table, "heldout_table.json")
    run.tracker.log_text(dt.markdown(table), "heldout_table.md")
    return dt.metrics(table)


def finish(run: StageRun, plan: MOPDPlan) -> str:
    """The student's final/ directory (what eval reads)."""
    run.numbers(run.meta(plan.checkpoint_id))
    return str(plan.out_dir / "final")
