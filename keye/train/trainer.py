"""One training stage on accelerate: packed batches from the resumable loader, gradient accumulation to a token
budget, per-stage freezing and attention mode, NaN/inf guard, exact resume from atomic step checkpoints.

Follows the shape of torchtitan's train loop (token-weighted loss over the global batch, step checkpoints with
loader state) and accelerate's Accelerator for the device/DDP/FSDP2 plumbing. The loss of one optimizer step is
the mean over ALL target tokens of the global batch (every micro-batch of every rank), so 2 ranks x k packs give
the same gradient as 1 rank x 2k packs; MoE aux and DSA indexer losses are averaged over micro-batches.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from keye.core.hashing import stable_hash64
from keye.data.loader import PackedBatch, PackLoader, open_loader
from keye.data.packing import read_pack_index
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import load_tokenizer
from keye.model import KeyeVL, build_model, load_checkpoint, save_checkpoint
from keye.model.checkpoint import read_state
from keye.model.lm import chunked_cross_entropy, shifted_targets
from keye.train import checkpointing as ckpt
from keye.train.freezing import apply_trainable, param_groups
from keye.train.metrics import H200_BF16_PEAK, expert_load, mfu, topk_mass_share, training_flops
from keye.train.schedules import build_scheduler
from keye.train.settings import StageSettings

LogFn = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    checkpoint_dir: Path  # out_dir/"final": keye.model checkpoint layout
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged values (+ totals)
    resumed_from_step: int | None = None


class NonFiniteLoss(RuntimeError):
    """Raised under nan_policy=stop (or after max_bad_steps skips): the step was not applied, nothing was saved."""


# --------------------------------------------------------------------------------------------- batch preparation
def _sample_tasks(batch: PackedBatch) -> list[str]:
    return [sid.split(":")[1] if sid.count(":") >= 2 else "?" for sid in batch.sample_ids]


def _keep(seed: int, epoch: int, sample_id: str, p: float) -> bool:
    """Deterministic coin (no RNG state: identical after a resume) for down-weighting a task's loss."""
    if p >= 1.0:
        return True
    return stable_hash64(f"{seed}:{epoch}:{sample_id}") / 2**64 < p


def stage_labels(batch: PackedBatch, settings: StageSettings, image_token_id: int, epoch: int) -> Tensor:
    """Labels of a pack for this stage: answer-only (the loader's) or every text token; task weights applied as
    the probability that a sample's loss is kept (weight / max weight; weight 0 drops the task)."""
    labels = batch.labels.clone()
    if not settings.answer_only_loss:
        labels = batch.input_ids.clone()
        labels[batch.input_ids == image_token_id] = -100
    if settings.task_weights:
        top = max(settings.task_weights.values()) or 1.0
        cu = batch.cu_seqlens.tolist()
        for j, (sid, task) in enumerate(zip(batch.sample_ids, _sample_tasks(batch), strict=True)):
            p = settings.task_weights.get(task, 0.0) / top
            if not _keep(settings.seed, epoch, sid, p):
                labels[cu[j] : cu[j + 1]] = -100
    return labels


def _empty_inputs(pad_id: int) -> dict[str, Tensor]:
    """A one-token, no-loss micro-batch: keeps ranks in step when a pack had only bad samples."""
    return {
        "input_ids": torch.tensor([pad_id], dtype=torch.int64),
        "labels": torch.tensor([-100], dtype=torch.int64),
        "position_ids": torch.zeros(3, 1, dtype=torch.int64),
        "cu_seqlens": torch.tensor([0, 1], dtype=torch.int32),
    }


def _micro_inputs(batch: PackedBatch, labels: Tensor, pad_id: int, device: torch.device) -> dict[str, Tensor]:
    if not batch.sample_ids:
        inputs = _empty_inputs(pad_id)
    else:
        inputs = batch.model_inputs()
        inputs["labels"] = labels
        if inputs["pixel_patches"].shape[0] == 0:  # text-only pack: skip the ViT
            for k in ("pixel_patches", "patch_grids", "vision_cu_seqlens"):
                inputs.pop(k)
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def pack_stream(loader: PackLoader) -> Iterator[PackedBatch]:
    """Endless iteration over epochs of the loader (its cursor stays exact between items). An epoch that yields
    nothing (no packs for this rank, or every sample bad, e.g. shards not found) is an error, not a hang."""
    while True:
        start = loader.state_dict()["next"]
        got = False
        for b in loader:
            got = True
            yield b
        if not got and start == 0:
            bad = loader.bad_log[-3:]
            raise RuntimeError(
                f"a whole epoch of {len(loader)} packs gave no usable sample (bad samples: {loader.bad_samples}; "
                f"last reasons: {bad}); check the pack index and the shard paths"
            )


# --------------------------------------------------------------------------------------------- model preparation
def _prepare_model(
    settings: StageSettings,
    init_checkpoint: str | Path | None,
    model_preset: str,
    vocab_size: int | None,
    image_token_id: int | None,
) -> KeyeVL:
    if init_checkpoint is not None:
        model = load_checkpoint(init_checkpoint)
    else:
        model = build_model(
            model_preset, vocab_size=vocab_size, image_token_id=image_token_id, seed=settings.seed
        )
    cfg = model.config
    if settings.rope_base is not None:
        cfg.lm.rope_theta = float(settings.rope_base)
    model.set_attention_mode(settings.attention_mode or "dense")
    cfg.lm.router_aux_loss_coef = settings.aux_coef if settings.moe_balance == "aux" else 0.0
    if settings.moe_balance == "bias":
        cfg.lm.router_bias = True
        for layer in model.lm.layers:  # the bias now selects experts: it must be saved with the weights
            layer.mlp._non_persistent_buffers_set.discard("router_bias")
    model.set_gradient_checkpointing(settings.activation_checkpointing)
    return model.train()


def _load_weights(model: KeyeVL, model_dir: Path) -> None:
    state = read_state(model_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        m for m in missing if not m.endswith("lm_head.weight") or not model.config.lm.tie_word_embeddings
    ]
    if missing or unexpected:
        raise KeyError(f"step checkpoint {model_dir} does not match the model: {missing=} {unexpected=}")


def _all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------------------------- the stage
def train_stage(
    settings: StageSettings,
    *,
    init_checkpoint: str | Path | None,
    model_preset: str,
    vocab_size: int | None,
    image_token_id: int | None,
    pack_index: Path,
    shards: Mapping[str, str] | Path,
    tokenizer_dir: Path,
    policy: SamplingPolicy,
    out_dir: Path,
    log_metrics: LogFn | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train one stage into out_dir (step-N/ checkpoints, final/ model). Re-running with the same out_dir resumes
    from the newest complete step checkpoint; a finished stage returns at once. See keye/train/__init__.py."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    out_dir = Path(out_dir)
    final_dir = out_dir / "final"
    want_cpu = (str(device).startswith("cpu")) if device is not None else not torch.cuda.is_available()
    acc = Accelerator(
        cpu=want_cpu,
        mixed_precision="no" if want_cpu else "bf16",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    rank, world = acc.process_index, acc.num_processes
    log = log_metrics if (log_metrics is not None and acc.is_main_process) else None

    latest = ckpt.latest_checkpoint(out_dir)
    if latest is not None and latest[0] >= settings.steps and (final_dir / "config.json").is_file():
        meta = ckpt.read_trainer_state(latest[1])
        return TrainResult(final_dir, latest[0], dict(meta.get("last_metrics", {})), latest[0])

    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    model = _prepare_model(settings, init_checkpoint, model_preset, vocab_size, image_token_id)
    if latest is not None:
        _load_weights(model, latest[1] / "model")
    apply_trainable(model, settings.trainable or "all", settings.attention_mode or "dense")
    model.to(acc.device)
    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas, foreach=False
    )
    wrapped, optimizer = acc.prepare(model, optimizer)
    inner_opt = getattr(optimizer, "optimizer", optimizer)
    scheduler = build_scheduler(
        inner_opt,
        settings.steps,
        settings.warmup_steps,
        settings.schedule,
        settings.min_lr_ratio,
        settings.decay_fraction,
    )

    tok = load_tokenizer(tokenizer_dir)
    pad_id = int(tok.pad_id)
    image_id = model.config.image_token_id
    if isinstance(shards, Mapping):  # the index names shards by stem or by file name: accept both spellings
        shards = {
            **{k.removesuffix(".tar"): str(v) for k, v in shards.items()},
            **{k: str(v) for k, v in shards.items()},
        }
    loader = open_loader(
        pack_index,
        shards,
        tok,
        policy,
        rank=rank,
        world_size=world,
        num_workers=settings.num_workers,
        seed=settings.seed,
        shuffle=settings.shuffle,
        skip_empty=world == 1,
    )
    index = read_pack_index(pack_index)
    n_packs = max(1, loader.stream.n_packs)
    mean_pack = float(np.asarray(index.column("tokens").to_numpy(), np.float64).sum()) / n_packs
    accum = max(1, round(settings.tokens_per_step / (world * max(mean_pack, 1.0))))

    start_step = 0
    bad_steps_total = 0
    if latest is not None:
        state = ckpt.read_trainer_state(latest[1])
        optim_state, rng = ckpt.read_rank_files(latest[1], rank)
        inner_opt.load_state_dict(optim_state)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"][rank])
        ckpt.set_rng_state(rng)
        start_step = int(state["step"])
        bad_steps_total = int(state.get("bad_steps", 0))
        if acc.is_main_process:
            print(f"[train {settings.name}] resuming from {latest[1]} (step {start_step})", flush=True)

    stream = pack_stream(loader)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    peak = settings.peak_flops or (None if want_cpu else H200_BF16_PEAK)
    probe_mode = settings.attention_mode != "dense"
    hidden_box: dict[str, Tensor] = {}
    hook = model.lm.norm.register_forward_hook(lambda _m, _i, o: hidden_box.__setitem__("h", o.detach()))
    last: dict[str, float] = {}
    consecutive_bad = 0
    step = start_step
    try:
        while step < settings.steps:
            t0 = time.perf_counter()
            micro = []
            for _ in range(accum):
                b = next(stream)
                labels = stage_labels(b, settings, image_id, loader.stream.epoch)
                n = int((shifted_targets(labels, b.cu_seqlens) != -100).sum()) if b.sample_ids else 0
                micro.append((b, labels, n))
            local_n = sum(n for _, _, n in micro)
            counts = torch.tensor([float(local_n)], dtype=torch.float64, device=acc.device)
            if world > 1:
                dist.all_reduce(counts)
            global_n = max(1.0, float(counts[0]))

            sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # lm*n, aux, indexer, tokens
            expert_counts: Tensor | None = None
            task_sum: dict[str, list[float]] = {}
            lengths: list[int] = []
            for i, (b, labels, n) in enumerate(micro):
                inputs = _micro_inputs(b, labels, pad_id, acc.device)
                sync = i == len(micro) - 1
                ctx = acc.no_sync(wrapped) if (world > 1 and not sync) else _null()
                with ctx:
                    out = wrapped(**inputs)
                    aux_t = out.aux_loss if out.aux_loss is not None else out.lm_loss * 0
                    idx_t = out.indexer_loss if out.indexer_loss is not None else out.lm_loss * 0
                    coef = model.config.lm.router_aux_loss_coef
                    loss = out.lm_loss * (n * world / global_n) + (coef * aux_t + idx_t) / len(micro)
                    if not loss.requires_grad:  # e.g. a text-only pack in a projector-only stage
                        loss = loss + sum(p.reshape(-1)[0] * 0.0 for p in params)
                    acc.backward(loss)
                sums += torch.stack(
                    [
                        out.lm_loss.detach().double() * n,
                        aux_t.detach().double(),
                        idx_t.detach().double(),
                        torch.tensor(
                            float(inputs["input_ids"].shape[0]), dtype=torch.float64, device=acc.device
                        ),
                    ]
                )
                ec = out.expert_counts.detach()
                expert_counts = ec if expert_counts is None else expert_counts + ec
                if b.sample_ids:
                    lengths.extend(torch.diff(b.cu_seqlens).tolist())
                    if step % settings.log_every == 0 and world == 1 and "h" in hidden_box:
                        _task_losses(hidden_box.pop("h"), model, inputs, b, task_sum)
                if probe_mode and step % settings.probe_every == 0 and i == 0 and b.sample_ids:
                    last["dsa_topk_mass_share"] = _probe_topk_share(model, inputs)
                hidden_box.clear()
            if world > 1:
                dist.all_reduce(sums)
                dist.all_reduce(expert_counts)
            grad_norm = acc.clip_grad_norm_(params, settings.grad_clip)
            gn = float(grad_norm) if grad_norm is not None else 0.0
            lm_loss = float(sums[0]) / global_n
            finite = math.isfinite(lm_loss) and math.isfinite(gn) and math.isfinite(float(sums[2]))
            if finite:
                optimizer.step()
                consecutive_bad = 0
                if settings.moe_balance == "bias" and settings.bias_rate > 0 and expert_counts is not None:
                    for li, layer in enumerate(model.lm.layers):
                        layer.mlp.update_router_bias(expert_counts[li], settings.bias_rate)
            else:
                consecutive_bad += 1
                bad_steps_total += 1
                msg = (
                    f"[train {settings.name}] non-finite step {step}: lm_loss={lm_loss} grad_norm={gn}; "
                    f"update skipped ({consecutive_bad} in a row)"
                )
                if settings.nan_policy == "stop" or consecutive_bad >= settings.max_bad_steps:
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(msg + "; stopping (no checkpoint written for this step)")
                if acc.is_main_process:
                    print(msg, flush=True)
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped update still advances the schedule (by design)
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            n_mb = len(micro) * world
            tokens = float(sums[3])
            flops = training_flops(model.config.lm, lengths) * world if lengths else 0.0
            last.update(
                {
                    "loss": lm_loss
                    + (float(sums[1]) * model.config.lm.router_aux_loss_coef + float(sums[2])) / n_mb,
                    "lm_loss": lm_loss,
                    "aux_loss": float(sums[1]) / n_mb,
                    "lr": lr,
                    "grad_norm": gn,
                    "tokens_per_s": tokens / dt,
                    "target_tokens": global_n,
                    "step_time_s": dt,
                    "skipped_steps": float(bad_steps_total),
                    **(expert_load(expert_counts) if expert_counts is not None else {}),
                }
            )
            if probe_mode:
                last["indexer_kl"] = float(sums[2]) / n_mb
            if peak is not None and flops:
                last["mfu"] = mfu(flops, dt, peak, world)
            for key in [k for k in last if k.startswith("loss/")]:
                del last[key]
            for task, (s, c) in task_sum.items():
                last[f"loss/{task}"] = s / max(c, 1.0)
            if log is not None and (step % settings.log_every == 0 or step == settings.steps):
                log(dict(last), step)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_step(
                    acc,
                    wrapped,
                    model,
                    inner_opt,
                    scheduler,
                    loader,
                    out_dir,
                    step,
                    settings,
                    last,
                    bad_steps_total,
                )
    finally:
        hook.remove()

    if acc.is_main_process:  # weights + tokenizer + frame policy: what keye.eval.keye_predict_fn loads
        build = out_dir / ".final.build"
        shutil.rmtree(build, ignore_errors=True)
        save_checkpoint(acc.unwrap_model(wrapped), build)
        tok.save(build)
        (build / "sampling_policy.json").write_text(policy.model_dump_json(indent=1) + "\n")
        ckpt._fsync_tree(build)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(build, final_dir)
    acc.wait_for_everyone()
    resumed = latest[0] if latest is not None else None
    return TrainResult(final_dir, step, dict(last), resumed)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _save_step(
    acc: Any,
    wrapped: torch.nn.Module,
    model: KeyeVL,
    inner_opt: torch.optim.Optimizer,
    scheduler: Any,
    loader: PackLoader,
    out_dir: Path,
    step: int,
    settings: StageSettings,
    last: dict[str, float],
    bad_steps: int,
) -> None:
    """All ranks write their optimizer/RNG files into the shared temp dir; rank 0 adds the model and commits.
    Refuses to write weights that are not finite (a poisoned checkpoint would be resumed forever)."""
    if not _all_finite(model):
        raise NonFiniteLoss(
            f"[train {settings.name}] weights are not finite at step {step}; checkpoint not written"
        )
    tmp = ckpt.temp_dir_for(out_dir, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    ckpt.write_rank_files(tmp, acc.process_index, inner_opt.state_dict())
    loader_state = [loader.state_dict()]
    if acc.num_processes > 1:
        gathered: list[Any] = [None] * acc.num_processes
        dist.all_gather_object(gathered, loader.state_dict())
        loader_state = gathered
    state_dict = acc.get_state_dict(wrapped)
    acc.wait_for_everyone()
    if acc.is_main_process:
        from keye.model.checkpoint import save_state

        save_state({k: v.detach().cpu() for k, v in state_dict.items()}, model.config, tmp / "model")
        trainer_state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "loader": loader_state,
            "bad_steps": bad_steps,
            "last_metrics": dict(last),
            "settings": settings.model_dump(mode="json"),
        }
        meta = {"step": step, "stage": settings.name, "kind": settings.kind, "world_size": acc.num_processes}
        ckpt.commit(tmp, ckpt.step_dir(out_dir, step), trainer_state, meta, settings.keep_last)
    acc.wait_for_everyone()


@torch.no_grad()
def _task_losses(
    hidden: Tensor, model: KeyeVL, inputs: dict[str, Tensor], batch: PackedBatch, acc_: dict[str, list[float]]
) -> None:
    """Per-task mean target loss of a micro-batch from the final hidden states (no extra forward)."""
    targets = shifted_targets(inputs["labels"], inputs["cu_seqlens"])
    cu = inputs["cu_seqlens"].tolist()
    weight = model.lm.lm_head.weight
    for j, task in enumerate(_sample_tasks(batch)):
        t = targets[cu[j] : cu[j + 1]]
        total, n = chunked_cross_entropy(hidden[cu[j] : cu[j + 1]].to(weight.dtype), weight, t)
        if n:
            s = acc_.setdefault(task, [0.0, 0.0])
            s[0] += float(total)
            s[1] += n


@torch.no_grad()
def _probe_topk_share(model: KeyeVL, inputs: dict[str, Tensor], max_len: int = 1024) -> float:
    """Share of dense attention mass the indexer's top-k captures, layer 0, first sample (at most max_len rows),
    text embeddings only (a diagnostic: visual rows keep their placeholder embedding here)."""
    n = min(int(inputs["cu_seqlens"][1]), max_len)
    ids = inputs["input_ids"][:n]
    pos = inputs["position_ids"][:, :n]
    lm = model.lm
    layer = lm.layers[0]
    x = layer.input_layernorm(lm.embed_tokens(ids))
    (cos, sin), (ci, si) = lm.rope(pos)
    attn = layer.self_attn
    c = model.config.lm
    from keye.model.rope import apply_rope

    q = apply_rope(
        attn.q_norm(attn.q_proj(x).view(n, c.num_heads, c.head_dim)), cos.to(x.dtype), sin.to(x.dtype)
    )
    k = apply_rope(
        attn.k_norm(attn.k_proj(x).view(n, c.num_kv_heads, c.head_dim)), cos.to(x.dtype), sin.to(x.dtype)
    )
    q_idx, k_idx, w = attn.indexer(x, ci.to(x.dtype), si.to(x.dtype))
    return topk_mass_share(q, k, q_idx, k_idx, w, c.dsa.topk, attn.scale)


def main() -> None:  # pragma: no cover - exercised through subprocess tests and `accelerate launch`
    """`python -m keye.train.trainer SPEC.json`: SPEC holds {"settings": {...}, and the train_stage keywords}.
    Used by `accelerate launch` / `torchrun` and by the resume/distributed tests; metrics go to stdout as JSON."""
    import json
    import sys

    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = StageSettings(**spec.pop("settings"))
    metrics_file = spec.pop("metrics_file", None)

    def log(m: dict[str, float], s: int) -> None:
        line = json.dumps({"step": s, **m})
        print(line, flush=True)
        if metrics_file:
            with open(metrics_file, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())

    spec["policy"] = SamplingPolicy(**spec["policy"])
    for key in ("pack_index", "tokenizer_dir", "out_dir"):
        spec[key] = Path(spec[key])
    res = train_stage(settings, log_metrics=log, **spec)
    print(
        json.dumps({"done": True, "steps": res.steps, "resumed_from_step": res.resumed_from_step}), flush=True
    )


if __name__ == "__main__":  # pragma: no cover
    main()
