"""The agent_rl stage: agent GRPO with the frames / search / python tools on the trained checkpoint, over tasks
derived from the training split's annotations, then the held-out agent tasks answered by the checkpoint it started
from and by the new one (success, tool calls, self-correction, paired sign test); one checkpoint out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keye.agent.sandbox import SandboxLimits
from keye.agent.tasks import annotations_of, corpus, derive_tasks, write_tasks
from keye.core.atomic import atomic_write_json
from keye.core.config import AgentRLSettings
from keye.core.hashing import hash_checkpoint_dir, settings_hash
from keye.core.lineage import AGENT_EVAL_FILE
from keye.data.sampling import SamplingPolicy
from keye.rl.agent_eval import compare, evaluate_agent
from keye.rl.agent_rl import AgentRLSchedule, AgentToolSettings, env_factory, train_agent_rl
from keye.rl.agent_rollouts import AgentSettings
from keye.rl.grpo import GRPOSettings

# only for annotations: the helpers below run without the stage machinery (bench/agent_rl_heldout.py on a GPU box)
if TYPE_CHECKING:
    from keye.stages.artifact import StageRun


@dataclass
class AgentRLPlan:
    checkpoint_id: str
    build: bool  # False: a previous run completed this output
    init: str  # the checkpoint it starts from
    videoset_id: str
    out_dir: Path


def settings(s: AgentRLSettings) -> tuple[GRPOSettings, AgentSettings, AgentToolSettings]:
    """The library's settings from the config section."""
    grpo = GRPOSettings(
        group_size=s.group_size,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        loss_agg_mode=s.loss_agg_mode,
        clip_ratio_low=s.clip_ratio_low,
        clip_ratio_high=s.clip_ratio_high,
        kl_coef=s.kl_coef,
        micro_batch_size=s.micro_batch_size,
    )
    agent = AgentSettings(s.group_size, s.max_new_tokens, s.max_response_tokens, s.temperature)
    tools = AgentToolSettings(
        tools=tuple(s.tools),
        max_turns=s.max_turns,
        max_calls_per_turn=s.max_calls_per_turn,
        frames_max=s.frames_max,
        python=SandboxLimits(time_s=s.python_time_s, memory_mb=s.python_memory_mb),
    )
    return grpo, agent, tools


def plan(run: StageRun, checkpoint_dir: str | None, videoset_id: str | None) -> AgentRLPlan:
    """Run alone: the newest trained checkpoint and the newest VideoSet."""
    s = run.config.agent_rl
    init = checkpoint_dir or run.lineage.latest_checkpoint_path()
    sha = hash_checkpoint_dir(init)
    init_id = run.lineage.checkpoint_id_for(init, sha)
    videoset_id = run.input("videoset", videoset_id)
    ck_id = run.key("ag", sha, videoset_id, settings_hash(s), run.config.seed, run.config.eval.split)
    out_dir = run.workspace.checkpoints / ck_id
    build = run.produce(ck_id, "training", "agent_rl", s, [init_id, videoset_id], path=str(out_dir))
    return AgentRLPlan(ck_id, build, str(init), videoset_id, out_dir)


def _policy(checkpoint: str) -> SamplingPolicy:
    f = Path(checkpoint) / "sampling_policy.json"
    return SamplingPolicy.model_validate_json(f.read_text()) if f.is_file() else SamplingPolicy()


def train(run: StageRun, plan: AgentRLPlan) -> None:
    """Tasks from the training split, agent GRPO, trajectories to MLflow, the held-out comparison; recorded with
    edges from the init checkpoint and the VideoSet."""
    import torch

    s, lineage, cfg = run.config.agent_rl, run.lineage, run.config
    members = set(lineage.members(plan.videoset_id))
    videos = [v["path"] for v in lineage.videos("ok") if v["video_id"] in members]
    policy = _policy(plan.init)
    tasks = derive_tasks(videos, policy, s.first_fps, "train", s.frames_max, kinds=s.tools)
    heldout = derive_tasks(videos, policy, s.first_fps, cfg.eval.split, s.frames_max, kinds=s.tools)
    heldout = heldout[: s.eval_limit]
    docs = corpus(annotations_of(videos))
    write_tasks(plan.out_dir / "tasks" / "train.jsonl", tasks)
    write_tasks(plan.out_dir / "tasks" / "heldout.jsonl", heldout)
    device = s.device or cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grpo, agent, tools = settings(s)
    schedule = AgentRLSchedule(
        s.steps, s.lr, s.tasks_per_step, s.save_every, seed=cfg.seed, warmup_steps=s.warmup_steps,
        warmup_lr=s.warmup_lr, warmup_batch_size=s.warmup_batch_size, rl_only_fraction=s.rl_only_fraction,
    )  # fmt: skip
    result = train_agent_rl(
        plan.init, tasks, docs, plan.out_dir, schedule, grpo, agent, tools,
        device=device, log_metrics=run.tracker.log_metrics,
    )  # fmt: skip
    for path in result.trajectories:
        run.tracker.log_artifact(path, "trajectories")
    comparison = heldout_comparison(plan.init, str(result.checkpoint_dir), heldout, docs, tools, s, device)
    atomic_write_json(plan.out_dir / AGENT_EVAL_FILE, comparison)
    run.tracker.log_artifact(plan.out_dir / AGENT_EVAL_FILE)
    sha = hash_checkpoint_dir(result.checkpoint_dir)
    meta = {"steps": result.steps, "tasks": len(tasks), "heldout_tasks": len(heldout), **result.metrics}
    meta.update(_headline(comparison))
    lineage.record_checkpoint(
        plan.checkpoint_id, str(result.checkpoint_dir.resolve()), sha, "agent_rl", result.steps, run.run_id,
        run.inputs, meta,
    )  # fmt: skip
    lineage.complete_artifact(plan.checkpoint_id, sha256=sha, meta=meta)


def heldout_comparison(
    init: str,
    final: str,
    tasks: list[Any],
    docs: list[Any],
    tools: AgentToolSettings,
    s: AgentRLSettings,
    device: str,
) -> dict[str, Any]:
    """The held-out agent tasks answered (greedy) by the init checkpoint and the agent-RL one, compared."""
    from keye.serve.chat import ChatModel

    rows = {}
    warmup = Path(final).parent / "warmup"
    named = [("before", init), ("after", final)] + ([("warmup", str(warmup))] if warmup.is_dir() else [])
    for name, path in named:
        chat = ChatModel.from_checkpoint(path, device=device)
        rows[name] = evaluate_agent(
            chat, tasks, env_factory(chat, docs, tools), max_new_tokens=s.max_new_tokens,
            max_response_tokens=s.max_response_tokens,
        )  # fmt: skip
    out = {**compare(rows["before"], rows["after"]), "rows": rows}
    if "warmup" in rows:  # RL's own gain, over the demonstration warm-up it started from
        out["rl_over_warmup"] = compare(rows["warmup"], rows["after"])
    return out


def _headline(comparison: dict[str, Any]) -> dict[str, float]:
    out = {f"heldout_{k}_before": v for k, v in comparison["before"].items()}
    out.update({f"heldout_{k}_after": v for k, v in comparison["after"].items()})
    out["heldout_success_gain"] = comparison["success_gain"]
    out["heldout_tool_call_rate_gain"] = comparison["tool_call_rate_gain"]
    out["heldout_sign_test_p"] = float(comparison["sign_test"]["p_value"])
    if "rl_over_warmup" in comparison:
        w = comparison["rl_over_warmup"]
        out.update({f"heldout_{k}_warmup": v for k, v in w["before"].items()})
        out["heldout_rl_over_warmup_success_gain"] = w["success_gain"]
        out["heldout_rl_over_warmup_sign_test_p"] = float(w["sign_test"]["p_value"])
    return out


def finish(run: StageRun, plan: AgentRLPlan) -> str:
    """The agent-RL checkpoint's final/ directory (what eval reads); its metrics and the held-out comparison go to
    the summary."""
    run.numbers(run.meta(plan.checkpoint_id))
    return str(plan.out_dir / "final")


def heldout_report(out_dir: Path) -> dict[str, Any]:
    """The held-out comparison written by `train` (for the report and the CLI)."""
    return json.loads((Path(out_dir) / AGENT_EVAL_FILE).read_text())
