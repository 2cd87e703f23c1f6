"""The `keye` command. Its commands and options are a contract (DESIGN.md "The command line").

Prefect is imported only after the workspace is known, so PREFECT_HOME and friends point inside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Keye: long-video multimodal training pipeline."
)
convert_app = typer.Typer(no_args_is_help=True, help="Import weights from other layouts.")
app.add_typer(convert_app, name="convert")
eval_app = typer.Typer(
    invoke_without_command=True,
    help="Evaluate a checkpoint on a benchmark file (TimeLens, Video-MME, Video-MME-v2, LongVideoBench), or re-score.",
)
app.add_typer(eval_app, name="eval")

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="workspace directory")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config field: key=value (repeatable)")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="pipeline YAML (default: ./pipelines.yaml if present, else built-in)"
    ),
]


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(config: Path | None, overrides: list[str] | None, workspace: Path | None):
    from keye.core.config import ConfigError, load_config

    try:
        return load_config(config, overrides=overrides or [], workspace=workspace)
    except ConfigError as e:
        _fail(str(e))


_held_lock = None


def _prepare(workspace: str | Path) -> None:
    """Environment for Prefect, and the workspace lock taken before any flow starts (a second run fails at once,
    with one clear line instead of a flow-run traceback; the flows re-enter the same lock)."""
    global _held_lock
    from keye.core.workspace import Workspace, WorkspaceLock, WorkspaceLocked
    from keye.stages.artifact import configure_environment

    ws = Workspace.at(workspace)
    configure_environment(ws)
    try:
        _held_lock = WorkspaceLock(ws).__enter__()
    except WorkspaceLocked as e:
        _fail(str(e), 3)


def _run_guarded(fn):
    """Turn the errors a user can fix into one clear line and a non-zero exit, not a traceback."""
    from keye.core.config import ConfigError
    from keye.core.lineage import LineageError
    from keye.core.workspace import WorkspaceLocked
    from keye.model.integrity import CheckpointIntegrityError
    from keye.stages.sources import SourceError
    from keye.train.state_io import StateFormatError

    try:
        return fn()
    except WorkspaceLocked as e:
        _fail(str(e), 3)
    except (ConfigError, SourceError, LineageError, CheckpointIntegrityError, StateFormatError) as e:
        _fail(str(e), 2)


@app.command()
def run(
    pipeline: Annotated[Path | None, typer.Argument(help="pipeline YAML (default ./pipelines.yaml)")] = None,
    workspace: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="overrides the config's workspace")
    ] = None,
    stages: Annotated[str | None, typer.Option("--stages", help="comma-separated subset of stages")] = None,
    set_: SetOpt = None,
) -> None:
    """Run the pipeline flow (default: ./pipelines.yaml, its workspace)."""
    if pipeline is None:
        pipeline = Path("pipelines.yaml")
        if not pipeline.is_file():
            _fail("no pipelines.yaml here: pass a pipeline YAML (e.g. `keye run pipelines.yaml`)")
    overrides = list(set_ or [])
    stage_list = [x.strip() for x in stages.split(",") if x.strip()] if stages else None
    cfg = _load(pipeline, overrides + ([f"stages=[{stages}]"] if stages else []), workspace)
    _check_paths(cfg, None, str(pipeline))
    _prepare(cfg.workspace)
    from flows.pipeline import pipeline as pipeline_flow
    from keye.stages.summary import render

    summary = _run_guarded(
        lambda: pipeline_flow(
            config_path=str(pipeline),
            workspace=cfg.workspace,
            stages=stage_list,
            overrides=_as_dict(overrides) or None,
        )
    )
    typer.echo(render(summary))


def _as_dict(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        k, _, v = o.partition("=")
        out[k.strip()] = v
    return out


def _check_paths(cfg, stages: list[str] | None, origin: str) -> None:
    """Every path the stages will read, checked before the workspace is created (one line per problem)."""
    from keye.core.config import ConfigError
    from keye.core.config_paths import check_paths

    try:
        check_paths(cfg, stages, origin)
    except ConfigError as e:
        _fail(str(e))


def _stage_config(
    source: str | None, workspace: Path, config: Path | None, set_: list[str] | None, stage: str
):
    """A stage run alone uses the same settings as `keye run` would: ./pipelines.yaml when it exists."""
    if config is None and Path("pipelines.yaml").is_file():
        config = Path("pipelines.yaml")
    overrides = list(set_ or [])
    cfg = _load(config, overrides, workspace)
    if source is not None:
        from keye.core.config import PathSource, SyntheticSource

        src = SyntheticSource() if source == "synthetic" else PathSource(path=source)
        cfg = cfg.model_copy(update={"sources": [src]})
    _check_paths(cfg, [stage], str(config or "(built-in default)"))
    _prepare(cfg.workspace)
    return cfg


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="folder, glob, fsspec URL, manifest file, or 'synthetic'")],
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Scan, hash, probe and clip the videos of SOURCE."""
    cfg = _stage_config(source, workspace, config, set_, "ingest")
    from flows.ingest import ingest as ingest_flow

    vs = _run_guarded(lambda: ingest_flow(cfg))
    _print_stage(cfg, {"videoset": vs})


def _print_stage(cfg, outputs: dict[str, str]) -> None:
    from keye.core.lineage import Lineage
    from keye.stages.summary import pipeline_summary, render

    typer.echo(render(pipeline_summary(Lineage(cfg.workspace, read_only=True), outputs)))


@app.command()
def caption(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    videoset: Annotated[str | None, typer.Option(help="VideoSet id (default: the latest)")] = None,
) -> None:
    """Caption the clips of a VideoSet with the configured backend."""
    cfg = _stage_config(None, workspace, config, set_, "caption")
    from flows.caption import caption as caption_flow

    cs = _run_guarded(lambda: caption_flow(cfg, videoset))
    _print_stage(cfg, {"captionset": cs})


@app.command()
def shard(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    captionset: Annotated[str | None, typer.Option(help="CaptionSet id (default: the latest)")] = None,
) -> None:
    """Write WebDataset shards of the captioned clips."""
    cfg = _stage_config(None, workspace, config, set_, "shard")
    from flows.shard import shard as shard_flow

    ss = _run_guarded(lambda: shard_flow(cfg, captionset))
    _print_stage(cfg, {"shardset": ss})


@app.command()
def pack(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    shardset: Annotated[str | None, typer.Option(help="ShardSet id (default: the latest)")] = None,
) -> None:
    """Tokenizer + task samples + best-fit packing of a ShardSet."""
    cfg = _stage_config(None, workspace, config, set_, "pack")
    from flows.pack import pack as pack_flow

    ps = _run_guarded(lambda: pack_flow(cfg, shardset))
    _print_stage(cfg, {"packset": ps})


@app.command()
def train(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    packset: Annotated[str | None, typer.Option(help="PackSet id (default: the latest)")] = None,
) -> None:
    """Run the training recipes (train.stages) in order; a re-run resumes from the last step checkpoint."""
    cfg = _stage_config(None, workspace, config, set_, "train")
    from flows.train import train as train_flow

    final = _run_guarded(lambda: train_flow(cfg, packset))
    typer.echo(f"final checkpoint: {final}")


@app.command("video-rl")
def video_rl(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="checkpoint to start from (default: the newest trained one)")
    ] = None,
    videoset: Annotated[
        str | None, typer.Option(help="VideoSet id of the prompts (default: the latest)")
    ] = None,
) -> None:
    """Video-RL (GRPO-family, temporal reward, Context-RL) on a checkpoint; a re-run resumes from the last step."""
    cfg = _stage_config(None, workspace, config, set_, "video_rl")
    from flows.video_rl import video_rl as video_rl_flow

    final = _run_guarded(lambda: video_rl_flow(cfg, str(checkpoint) if checkpoint else None, videoset))
    typer.echo(f"RL checkpoint: {final}")


@app.command("agent-rl")
def agent_rl(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="checkpoint to start from (default: the latest)")
    ] = None,
) -> None:
    """Agent RL with the frames / search / python tools (docs/AGENT_RL.md); a re-run resumes."""
    cfg = _stage_config(None, workspace, config, set_, "agent_rl")
    from flows.agent_rl import agent_rl as agent_rl_flow

    final = _run_guarded(lambda: agent_rl_flow(cfg, checkpoint))
    typer.echo(f"final checkpoint: {final}")


@app.command()
def specialists(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[str | None, typer.Option(help="SFT checkpoint dir (default: the newest)")] = None,
) -> None:
    """Train the per-domain teachers of specialists.domains from the SFT checkpoint (MOPD's teachers)."""
    cfg = _stage_config(None, workspace, config, set_, "specialists")
    from flows.specialists import specialists as specialists_flow

    teacherset = _run_guarded(lambda: specialists_flow(cfg, checkpoint))
    typer.echo(f"teacher set: {teacherset}")


@app.command()
def mopd(
    workspace: WorkspaceOpt = Path("./workspace"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="student checkpoint (default: the specialists' parent)")
    ] = None,
    teacherset: Annotated[str | None, typer.Option(help="TeacherSet id (default: the newest)")] = None,
) -> None:
    """Distil the student from the teacher of each prompt's domain (mopd.teachers), on its own samples."""
    cfg = _stage_config(None, workspace, config, set_, "mopd")
    from flows.mopd import mopd as mopd_flow

    final = _run_guarded(lambda: mopd_flow(cfg, checkpoint, teacherset))
    typer.echo(f"final checkpoint: {final}")


@app.command()
def verify(
    workspace: WorkspaceOpt = Path("./workspace"),
    against: Annotated[
        Path | None,
        typer.Option(help="another workspace: compare every artifact by sha256, name the first that differs"),
    ] = None,
) -> None:
    """Re-hash every shard (and checkpoint) against lineage; with --against, compare two workspaces stage by
    stage (same commit, config and seed must give the same bytes). Non-zero exit on any mismatch."""
    if against is not None:
        from keye.workspace_compare import compare_workspaces

        cmp = _run_guarded(lambda: compare_workspaces(workspace, against))
        for line in cmp.lines():
            typer.echo(line)
        total = sum(cmp.compared.values())
        verdict = "identical" if cmp.identical else f"{len(cmp.differences)} difference(s)"
        typer.echo(f"compared {total} artifacts of {cmp.ours} and {cmp.theirs}: {verdict}")
        raise typer.Exit(0 if cmp.identical else 1)
    from keye.verify import verify_workspace

    report = _run_guarded(lambda: verify_workspace(workspace))
    for line in report.problems:
        typer.secho(f"MISMATCH {line}", fg=typer.colors.RED)
    typer.echo(f"verified {report.checked} artifacts: {len(report.problems)} problem(s)")
    raise typer.Exit(1 if report.problems else 0)


@app.command()
def lineage(
    artifact: Annotated[
        str, typer.Argument(help="an id (video, clip, caption, shard, pack, run, checkpoint) or a path")
    ],
    workspace: WorkspaceOpt = Path("./workspace"),
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Where an artifact came from (upstream) and what used it (downstream)."""
    from keye.core.lineage import Lineage

    def walk():
        store = Lineage(workspace, read_only=True)
        with store.pinned():  # one snapshot for the node and both walks
            node = store.resolve(artifact)
            return node, store.upstream(node["id"]), store.downstream(node["id"])

    node, up, down = _run_guarded(walk)
    if as_json:
        typer.echo(json.dumps({"node": node, "upstream": up, "downstream": down}, default=str, indent=2))
        return
    typer.echo(f"{node['kind']} {node['id']}  {node['label'] or ''}")
    for title, rows in (("upstream (came from)", up), ("downstream (used by)", down)):
        typer.echo(f"\n{title}: {len(rows)}")
        for r in rows:
            typer.echo(f"  {'  ' * (r['depth'] - 1)}{r['kind']:<10} {r['id']}  {r['label'] or ''}")


@app.command()
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint dir (weights + tokenizer.json beside them)")],
    host: Annotated[
        str, typer.Option(help="address to bind (keep 127.0.0.1 unless you mean to expose it)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(help="torch device of the model")] = "cpu",
    media_root: Annotated[Path | None, typer.Option(help="only serve video files under this folder")] = None,
    model_name: Annotated[
        str | None, typer.Option(help="model id clients send (default: the folder name)")
    ] = None,
) -> None:
    """OpenAI-compatible /v1/chat/completions and /v1/models over one checkpoint (keye.serve)."""
    from keye.serve.app import serve as _serve

    try:
        _serve(
            str(checkpoint),
            host,
            port,
            device=device,
            media_root=str(media_root) if media_root else None,
            model_name=model_name,
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@convert_app.command("hf")
def convert_hf(
    src_dir: Annotated[Path, typer.Argument(help="Hugging Face model dir (config.json + safetensors)")],
    out_dir: Annotated[Path, typer.Argument(help="output checkpoint dir")],
) -> None:
    """Qwen3-MoE causal LM or SigLIP vision weights -> this project's checkpoint."""
    from keye.model.convert import convert_hf as _convert

    try:
        out = _convert(src_dir, out_dir)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out}")


@eval_app.callback()
def eval_(
    ctx: typer.Context,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint dir (keye.model layout)")] = None,
    bench: Annotated[Path | None, typer.Option(help="benchmark file in its published layout")] = None,
    videos: Annotated[
        Path | None, typer.Option(help="folder the benchmark's videos are resolved from")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output dir: predictions.jsonl, metrics.json, report.html")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="timelens | videomme | videomme_v2 | longvideobench")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer dir (default: <checkpoint>/tokenizer)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="questions per generation batch")] = 8,
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N questions")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1 of `keye serve`) instead of --checkpoint"
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="the served model name (with --endpoint)")] = None,
) -> None:
    """keye eval --checkpoint DIR --bench FILE --videos DIR --out DIR  (or --endpoint URL --model NAME)"""
    if ctx.invoked_subcommand is not None:
        return
    source = ("--checkpoint", checkpoint) if endpoint is None else ("--model", model)
    missing = [n for n, v in (source, ("--bench", bench), ("--out", out)) if v is None]
    if missing:
        _fail(
            f"keye eval needs {', '.join(missing)} (or use `keye eval score --bench FILE --predictions FILE`)"
        )
    from keye.eval import BenchmarkFormatError, evaluate, keye_predict_fn

    try:
        if endpoint is not None:
            from keye.eval.endpoint import endpoint_predict_fn

            predict = endpoint_predict_fn(endpoint, model)
        else:
            predict = keye_predict_fn(checkpoint, tokenizer_dir=tokenizer, device=device)
        result = evaluate(
            predict, bench, videos or bench.parent, out, kind=kind, batch_size=batch_size, limit=limit
        )
    except (BenchmarkFormatError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result.metrics, indent=2, default=str))
    typer.echo(
        f"wrote {result.predictions_path}, {result.metrics_path}"
        + (f", {result.report_path}" if result.report_path else "")
    )


@eval_app.command("score")
def eval_score(
    bench: Annotated[Path, typer.Option(help="benchmark file in its published layout")],
    predictions: Annotated[Path, typer.Option(help="predictions.jsonl ({id, answer} per line)")],
    kind: Annotated[str | None, typer.Option(help="benchmark kind (default: detected from the file)")] = None,
    limit: Annotated[
        int | None, typer.Option(help="the first N questions only (as the run that made them)")
    ] = None,
    lenient: Annotated[
        bool,
        typer.Option(
            help="skip malformed lines and unknown or duplicate ids (warned, counted in the metrics)"
        ),
    ] = False,
) -> None:
    """Re-score saved predictions; prints the metrics as JSON."""
    from keye.eval import BenchmarkFormatError, score

    try:
        metrics = score(
            bench,
            predictions,
            kind=kind,
            limit=limit,
            lenient=lenient,
            warn=lambda m: typer.echo(m, err=True),
        )
    except (BenchmarkFormatError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps(metrics, indent=2, default=str))


@app.command()
def plan(
    preset: Annotated[str, typer.Option(help="model preset: tiny | small | 30b-a3b")] = "30b-a3b",
    gpus: Annotated[int, typer.Option(help="number of GPUs (the world size)")] = 8,
    seq: Annotated[int, typer.Option(help="tokens of one packed sequence per data-parallel rank")] = 32768,
    ep: Annotated[int | None, typer.Option(help="expert-parallel degree (default: suggested)")] = None,
    cp: Annotated[int | None, typer.Option(help="context-parallel degree (default: suggested)")] = None,
    attention: Annotated[str, typer.Option(help="dense | dsa")] = "dsa",
    act_ckpt: Annotated[bool, typer.Option(help="activation checkpointing")] = True,
    precision: Annotated[str, typer.Option(help="mixed (fp32 states, bf16 compute) | bf16")] = "mixed",
    budget_gib: Annotated[float, typer.Option(help="memory per GPU to plan for (GiB)")] = 0.85 * 139.8,
) -> None:
    """Memory per GPU of a training step and the mesh (dp_shard x ep x cp) to run it on (keye.train.plan)."""
    from keye.train.plan import memory_plan, render, suggest_mesh

    kw = {"attention": attention, "act_ckpt": act_ckpt, "precision": precision}
    try:
        if ep is None and cp is None:
            chosen, tried = suggest_mesh(preset, gpus, seq, budget_gib, **kw)
        else:
            e, c = ep or 1, cp or 1
            if gpus % (e * c):
                _fail(f"--ep {e} x --cp {c} does not divide --gpus {gpus}")
            chosen, tried = memory_plan(preset, gpus, seq, (gpus // (e * c), e, c), **kw), []
    except (KeyError, ValueError) as e:
        _fail(str(e))
    typer.echo(render(chosen, tried, budget_gib))
    raise typer.Exit(0 if chosen.fits(budget_gib) else 1)


@app.command()
def up(
    workspace: WorkspaceOpt = Path("./workspace"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port")] = 5000,
    worker: Annotated[bool, typer.Option(help="also start a process worker")] = True,
    pool: Annotated[str, typer.Option(help="work pool the worker polls")] = "keye-process",
    auto_port: Annotated[
        bool, typer.Option("--auto-port", help="take the next free port if one is busy")
    ] = False,
) -> None:
    """Start local Prefect and MLflow servers (127.0.0.1) with workspace-local stores."""
    from keye.services import ServiceError
    from keye.services import up as _up

    try:
        urls = _up(
            workspace,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            worker=worker,
            pool=pool,
            auto_port=auto_port,
        )
    except ServiceError as e:
        _fail(str(e))
    for name, url in urls.items():
        typer.echo(f"{name:<12} {url}")
    from keye.services import describe_worker

    if line := describe_worker(workspace):
        typer.echo(f"{'worker':<12} {line}")
    if "prefect_api" in urls:
        typer.echo(f"\nexport PREFECT_API_URL={urls['prefect_api']}")
    if "mlflow" in urls:
        typer.echo(f"export KEYE_MLFLOW_URI={urls['mlflow']}")


@app.command()
def down(workspace: WorkspaceOpt = Path("./workspace")) -> None:
    """Stop exactly the servers `keye up` started."""
    from keye.services import down as _down

    stopped = _down(workspace)
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def doctor(workspace: WorkspaceOpt = Path("./workspace"), config: ConfigOpt = None) -> None:
    """Check the environment: torch/triton/CUDA, versions, ports, disk, the device mesh; say how to fix it."""
    from keye.doctor import render, run_checks

    checks = run_checks(workspace, config)
    typer.echo(render(checks))
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


def main() -> None:  # pragma: no cover
    app(prog_name="keye")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
