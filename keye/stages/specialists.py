"""The specialists stage: one teacher per domain (grounding, multiple choice, captioning), each trained from the SFT
checkpoint on its own domain only, by outcome RL on the domain's training-split prompts (method rl) or by
supervised steps on the PackSet's packs of the domain's task (method sft: what makes a caption teacher, since a
model that never samples a caption cannot be rewarded into one), so that MOPD has a teacher that is best at each
domain. Output: a TeacherSet (domain -> checkpoint) with lineage to every specialist, its data and parent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye.core.config import SpecialistsSettings
from keye.core.hashing import hash_checkpoint_dir, settings_hash
from keye.rl.mopd import MOPDSettings
from keye.rl.mopd_prompts import domain_prompts
from keye.rl.mopd_train import MOPDSchedule, train_mopd
from keye.rl.rollouts import RolloutPrompt
from keye.stages.artifact import StageRun
from keye.train import StageSettings


@dataclass
class SpecialistsPlan:
    teacherset_id: str
    build: bool  # False: a previous run completed the TeacherSet
    init: str  # the SFT checkpoint every specialist starts from
    init_id: str
    videoset_id: str
    out_dir: Path
    packset_id: str | None = None  # the SFT specialists' packs (None: no domain uses method sft)
    todo: dict[str, str] = field(default_factory=dict)  # domain -> checkpoint id still to train
    checkpoints: dict[str, str] = field(default_factory=dict)  # domain -> checkpoint id
    sequential: str | None = None  # the forgetting baseline's checkpoint id (specialists.sequential)
    sequential_todo: bool = False


def device_of(run: StageRun, device: str | None) -> str:
    import torch

    d = device or run.config.train.device
    return d or ("cuda" if torch.cuda.is_available() else "cpu")


def videoset_videos(run: StageRun, videoset_id: str) -> list[str]:
    """The paths of the VideoSet's ingested videos (both splits; their sidecars say which)."""
    members = set(run.lineage.members(videoset_id))
    return [v["path"] for v in run.lineage.videos("ok") if v["video_id"] in members]


def training_prompts(
    run: StageRun, videoset_id: str, work_dir: Path, kinds: list[str]
) -> list[RolloutPrompt]:
    """Domain-tagged prompts of the VideoSet's training split (questions asked as the eval asks them)."""
    videos = videoset_videos(run, videoset_id)
    questions = [k for k in kinds if k != "caption"]
    return domain_prompts(videos, work_dir, "train", kinds=questions, captions="caption" in kinds)


def sft_recipe(s: SpecialistsSettings, domain: str) -> StageSettings:
    """A method-sft specialist's recipe: the train stage's sft kind, loss only on the domain's pack task."""
    steps = s.sft_steps
    return StageSettings(
        name=f"specialist_{domain}", kind="sft", steps=steps, lr=s.sft_lr, warmup_steps=min(5, steps),
        schedule="wsd", tokens_per_step=s.sft_tokens_per_step,
        task_weights={s.domains[domain].sft_task or domain: 1.0},
    )  # fmt: skip


def start_checkpoints(run: StageRun, checkpoint_dir: str | None) -> tuple[str, str | None]:
    """(the checkpoint every specialist starts from, the video_rl checkpoint trained from it or None). The pipeline
    passes video_rl's output on: then its parent is the start and it is the grounding specialist already made."""
    path = checkpoint_dir or run.lineage.latest_checkpoint_path()
    ck = run.lineage.checkpoint_id_for(path, hash_checkpoint_dir(path))
    if run.lineage.checkpoint(ck)["stage"] == "video_rl":
        parent = run.lineage.parent_checkpoint(ck, ["video_rl"])
        if parent is not None:
            return parent["path"], str(path)
    child = run.lineage.child_checkpoint(ck, "video_rl")
    return str(path), child["path"] if child else None


def plan(
    run: StageRun, checkpoint_dir: str | None, videoset_id: str | None, packset_id: str | None = None
) -> SpecialistsPlan:
    """Run alone: the newest trained checkpoint, VideoSet and (with a method-sft domain) PackSet."""
    s = run.config.specialists
    init, rl_checkpoint = start_checkpoints(run, checkpoint_dir)
    sha = hash_checkpoint_dir(init)
    init_id = run.lineage.checkpoint_id_for(init, sha)
    reused: dict[str, str] = {}
    for domain, spec in sorted(s.domains.items()):
        if spec.method == "video_rl":
            if rl_checkpoint is None:
                raise ValueError(
                    f"specialists.domains.{domain}: method video_rl takes the video_rl stage's checkpoint trained "
                    f"from {init}, and there is none: run the video_rl stage first, or use method rl"
                )
            reused[domain] = run.lineage.checkpoint_id_for(rl_checkpoint, hash_checkpoint_dir(rl_checkpoint))
    videoset_id = run.input("videoset", videoset_id)
    uses_sft = any(d.method == "sft" for d in s.domains.values())
    packset_id = run.input("packset", packset_id) if uses_sft else None
    common = s.model_dump(mode="json", exclude={"domains", "sequential"})
    ts_id = run.key(
        "ts", sha, videoset_id, packset_id, settings_hash(s), run.config.seed, sorted(reused.items())
    )
    out_dir = run.workspace.checkpoints / ts_id
    p = SpecialistsPlan(ts_id, False, str(init), init_id, videoset_id, out_dir, packset_id)
    for domain, spec in sorted(s.domains.items()):
        if domain in reused:
            p.checkpoints[domain] = reused[domain]
            continue
        data = packset_id if spec.method == "sft" else videoset_id
        ck = run.key("sp", sha, data, domain, settings_hash(spec), settings_hash(common), run.config.seed)
        p.checkpoints[domain] = ck
        path = str(out_dir / domain)
        if run.produce(ck, "training", f"specialist:{domain}", spec, [init_id, data], path=path):
            p.todo[domain] = ck
    if s.sequential:
        first = p.checkpoints[s.sequential[0]]
        chain = [(d, settings_hash(s.domains[d])) for d in s.sequential]
        p.sequential = run.key("sq", first, videoset_id, chain, settings_hash(common), run.config.seed)
        path = str(out_dir / "sequential")
        p.sequential_todo = run.produce(
            p.sequential, "training", "sequential", {"chain": s.sequential}, [first, videoset_id], path=path
        )
    teachers = list(p.checkpoints.values()) + ([p.sequential] if p.sequential else [])
    p.build = run.produce(ts_id, "teacherset", "specialists", s, teachers, path=str(out_dir))
    return p


def train(run: StageRun, plan: SpecialistsPlan) -> None:
    """Each specialist still to train (resuming from its step checkpoints), the sequential baseline, then the
    TeacherSet."""
    s, lineage = run.config.specialists, run.lineage
    kinds = sorted({k for d in s.domains.values() if d.method == "rl" for k in d.kinds})
    needs_prompts = plan.sequential_todo or any(s.domains[d].method == "rl" for d in plan.todo)
    prompts = (
        training_prompts(run, plan.videoset_id, plan.out_dir / "prompts", kinds) if needs_prompts else []
    )
    for domain, ck in plan.todo.items():
        spec = s.domains[domain]
        if spec.method == "sft":
            assert plan.packset_id is not None  # plan() resolves it whenever a domain uses sft
            from keye.stages.train import train_on_packset

            recipe = sft_recipe(s, domain)
            result = train_on_packset(
                run,
                recipe,
                plan.packset_id,
                plan.init,
                plan.out_dir / domain,
                _log(run, domain),
                device=s.device,
            )
            numbers = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
            _record(run, plan, domain, ck, result.checkpoint_dir, result.steps, {"method": "sft", **numbers})
            continue
        result, n = _outcome_rl(run, plan.init, domain, prompts, plan.out_dir / domain, _log(run, domain))
        meta = {"method": "rl", "prompts": n, **result.metrics}
        _record(run, plan, domain, ck, result.checkpoint_dir, result.steps, meta)
    if plan.sequential_todo:
        _sequential(run, plan, prompts)
    if plan.build:
        teachers = {
            d: {"checkpoint_id": ck, "path": run.lineage.checkpoint(ck)["path"]}
            for d, ck in plan.checkpoints.items()
        }
        meta = {"teachers": teachers, "parent": plan.init, "parent_id": plan.init_id}
        if plan.sequential:
            meta["baselines"] = {
                "sequential": {
                    "checkpoint_id": plan.sequential,
                    "path": run.lineage.checkpoint(plan.sequential)["path"],
                    "chain": list(s.sequential),
                }
            }
        lineage.complete_artifact(plan.teacherset_id, sha256=settings_hash(meta), meta=meta)


def _log(run: StageRun, domain: str) -> Any:
    def log(m: dict[str, float], step: int) -> None:
        run.tracker.log_metrics({f"{domain}/{k}" if "/" not in k else k: v for k, v in m.items()}, step)

    return log


def _outcome_rl(
    run: StageRun, init: str, domain: str, prompts: list[RolloutPrompt], out_dir: Path, log: Any
) -> tuple[Any, int]:
    """The domain's RL recipe from `init`: on-policy outcome RL on its training-split prompts, no teacher. Returns
    keye.rl.mopd_train's result and the number of the domain's prompts."""
    s = run.config.specialists
    spec = s.domains[domain]
    mine = [
        RolloutPrompt(p.messages, {**p.reference, "domain": domain}, p.id)
        for p in prompts
        if p.reference.get("kind") in spec.kinds
    ]
    if not mine:
        raise ValueError(f"specialists.domains.{domain}: no training prompts of kinds {spec.kinds}")
    result = train_mopd(
        init,
        {},
        mine,
        out_dir,
        MOPDSchedule(
            steps=s.steps,
            lr=s.lr,
            prompts_per_step=s.prompts_per_step,
            save_every=s.save_every,
            seed=run.config.seed,
        ),
        MOPDSettings(
            group_size=s.group_size,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            alpha=1.0,
            loss_agg_mode="token-mean",
            domains=(domain,),
        ),
        {domain: spec.rewards},
        device=device_of(run, s.device),
        log_metrics=log,
    )
    return result, len(mine)


def _sequential(run: StageRun, plan: SpecialistsPlan, prompts: list[RolloutPrompt]) -> None:
    """The forgetting baseline: the chain's first specialist, then each next domain's RL recipe on that model."""
    chain = run.config.specialists.sequential
    assert plan.sequential is not None
    current = run.lineage.checkpoint(plan.checkpoints[chain[0]])["path"]
    result = None
    for i, domain in enumerate(chain[1:], start=1):
        out = plan.out_dir / "sequential" / f"{i}-{domain}"
        result, _ = _outcome_rl(run, current, domain, prompts, out, _log(run, f"sequential_{domain}"))
        current = str(result.checkpoint_dir)
    assert result is not None  # the config check asks for two or more domains
    sha = hash_checkpoint_dir(result.checkpoint_dir)
    path = str(Path(result.checkpoint_dir).resolve())
    first = plan.checkpoints[chain[0]]
    meta = {"steps": result.steps, "chain": list(chain), "path": path}
    run.lineage.record_checkpoint(
        plan.sequential, path, sha, "sequential", result.steps, run.run_id, [first, plan.videoset_id], meta
    )
    run.lineage.complete_artifact(plan.sequential, sha256=sha, meta=meta)


def _record(
    run: StageRun,
    plan: SpecialistsPlan,
    domain: str,
    ck: str,
    checkpoint: Path,
    steps: int,
    meta: dict[str, Any],
) -> None:
    """The specialist's checkpoint with edges from its parent and its data (the VideoSet, or the PackSet)."""
    sha = hash_checkpoint_dir(checkpoint)
    sft = run.config.specialists.domains[domain].method == "sft"
    data = plan.packset_id if sft else plan.videoset_id
    meta = {"steps": steps, "domain": domain, **meta}
    path = str(Path(checkpoint).resolve())
    run.lineage.record_checkpoint(
        ck, path, sha, f"specialist:{domain}", steps, run.run_id, [plan.init_id, data], meta
    )
    run.lineage.complete_artifact(ck, sha256=sha, meta={**meta, "path": path})


def finish(run: StageRun, plan: SpecialistsPlan) -> str:
    """The TeacherSet id (what the mopd stage routes to); each specialist's last metrics go to the summary."""
    for domain, ck in plan.checkpoints.items():
        run.numbers({f"{domain}/{k}" if "/" not in k else k: v for k, v in run.meta(ck).items()})
    return plan.teacherset_id
