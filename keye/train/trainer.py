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

from keye.core.atomic import atomic_dir
from keye.core.hashing import stable_hash64
from keye.data.loader import PackedBatch, PackLoader, open_loader
from keye.data.packing import read_pack_index
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import load_tokenizer
from keye.determinism import seed_everything, without_timings
from keye.model import KeyeVL, build_model, load_checkpoint, save_checkpoint
from keye.model.checkpoint import read_state
from keye.model.lm import chunked_cross_entropy, shifted_targets, token_cross_entropy
from keye.train import checkpointing as ckpt
from keye.train.bundle import bundle_checkpoint
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


def _target_samples(targets: Tensor, cu_seqlens: Tensor) -> Tensor:
    """The sample (index into cu_seqlens) of every target row (targets != -100), in row order."""
    rows = torch.arange(targets.numel(), device=targets.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)[targets != -100]


def _seq_mean_losses(hidden: Tensor, model: KeyeVL, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(token-mean loss, for the metrics; sum over samples of each sample's mean token loss, the objective)."""
    cu = inputs["cu_seqlens"]
    targets = shifted_targets(inputs["labels"], cu)
    losses = token_cross_entropy(hidden, model.lm.lm_head.weight, targets)
    if losses.numel() == 0:
        zero = hidden.sum() * 0.0
        return zero, zero
    sample = _target_samples(targets, cu)
    per_sample = torch.bincount(sample, minlength=cu.numel() - 1).to(losses.dtype)
    return losses.mean(), (losses / per_sample[sample]).sum()


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
    # the selection mode lives in the model config, so final/config.json carries it to eval, serve and decode
    if settings.dsa_selection is not None:
        cfg.lm.dsa.selection = settings.dsa_selection
    if settings.dsa_selection_block is not None:
        cfg.lm.dsa.selection_block = int(settings.dsa_selection_block)
    if settings.dsa_indexer_dtype is not None:
        cfg.lm.dsa.indexer_dtype = settings.dsa_indexer_dtype
    model.set_attention_mode(settings.attention_mode or "dense")
    cfg.lm.router_aux_loss_coef = settings.aux_coef if settings.moe_balance == "aux" else 0.0
    if settings.moe_balance == "bias":
        cfg.lm.router_bias = True
        for layer in model.lm.layers:  # the bias now selects experts: it must be saved with the weights
            layer.mlp._non_persistent_buffers_set.discard("router_bias")
    model.set_gradient_checkpointing(settings.activation_checkpointing)
    return model.train()


def _model_config(init_checkpoint: str | Path | None, model_preset: str) -> Any:
    """The model's config without building it (the mesh is checked against it before any work)."""
    from keye.model.checkpoint import read_config
    from keye.model.config import preset

    return read_config(init_checkpoint) if init_checkpoint is not None else preset(model_preset)


def _load_weights(model: KeyeVL, model_dir: Path) -> None:
    state = read_state(model_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        m for m in missing if not m.endswith("lm_head.weight") or not model.config.lm.tie_word_embeddings
    ]
    if missing or unexpected:
        raise KeyError(f"step checkpoint {model_dir} does not match the model: {missing=} {unexpected=}")


def _all_finite(model: torch.nn.Module) -> bool:
    """This rank's weights (its shards under FSDP2) are finite."""
    return all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters()
    )


# --------------------------------------------------------------------------------------------- the stage
@dataclass
class _StepTotals:
    """What the micro-batches of one optimizer step add up (all-reduced over ranks)."""

    sums: Tensor  # float64 [4]: lm_loss * target tokens, aux, indexer, input tokens
    expert_counts: Tensor | None = None
    task_sum: dict[str, list[float]] = field(default_factory=dict)  # task -> [loss sum, target tokens]
    lengths: list[int] = field(default_factory=list)  # sample lengths (for the FLOPs)


class Trainer:
    """One training stage into out_dir (step-N/ checkpoints, final/ model), in the order a reader follows it:
    `__init__` builds model, optimizer, schedule and loader; `resume` restores the newest step checkpoint;
    `step` runs one optimizer step (gradient accumulation to the token budget, NaN/inf policy); `log` fills the
    metrics; `save` writes a step checkpoint; `export` writes final/ (weights, tokenizer, frame policy)."""

    def __init__(
        self,
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
        parallel: Mapping[str, Any] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.settings, self.policy, self.tokenizer_dir = settings, policy, Path(tokenizer_dir)
        self.out_dir = Path(out_dir)
        self.final_dir = self.out_dir / "final"
        self.want_cpu = (
            (str(device).startswith("cpu")) if device is not None else not torch.cuda.is_available()
        )
        self.acc = Accelerator(
            cpu=self.want_cpu,
            mixed_precision="no" if self.want_cpu else "bf16",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        # `parallel` (train.parallel): the dp_shard x ep x cp mesh, FSDP2 fully_shard over it and sharded DCP step
        # checkpoints (keye.train.sharded_training) instead of accelerate's DDP and rank-0 gathers; on any number
        # of ranks (one included: e.g. a sharded checkpoint resumed on one process)
        self.sharded = parallel is not None
        if self.sharded:
            from keye.train import sharded_training

            self.par, self.shape = sharded_training.check_parallel(
                parallel, self.world, _model_config(init_checkpoint, model_preset)
            )
            sharded_training.init_process_group(self.world, self.acc.device)
        self.pending_save = None
        self.log_fn = log_metrics if (log_metrics is not None and self.acc.is_main_process) else None
        self.latest = ckpt.latest_checkpoint(self.out_dir)
        if self.latest is not None and not self.sharded and _is_sharded(self.latest[1]):
            raise ValueError(
                f"{self.latest[1]} is a sharded (DCP) step checkpoint: resume it with `parallel` set (on any "
                "number of ranks whose data-parallel degree divides the packs of a step)"
            )
        self.step_no, self.bad_steps, self.consecutive_bad = 0, 0, 0
        self.global_samples = 1.0
        if self.sharded and self.shape.cp > 1 and settings.loss_agg_mode != "token-mean":
            raise ValueError(
                f"recipe {settings.name}: loss_agg_mode {settings.loss_agg_mode!r} is not supported with context "
                "parallelism (train.parallel.cp > 1): use token-mean"
            )
        self.last: dict[str, float] = {}
        if self.finished() is None:
            self._build(init_checkpoint, model_preset, vocab_size, image_token_id)
            self._open_data(pack_index, shards)

    def finished(self) -> TrainResult | None:
        """The result of a stage already trained to its last step in out_dir (then there is nothing to do)."""
        latest, final = self.latest, self.final_dir
        if latest is not None and latest[0] >= self.settings.steps and (final / "config.json").is_file():
            meta = _trainer_state(latest[1])
            return TrainResult(final, latest[0], dict(meta.get("last_metrics", {})), latest[0])
        return None

    def _build(self, init_checkpoint, model_preset, vocab_size, image_token_id) -> None:
        s = self.settings
        seed_everything(s.seed)
        model = _prepare_model(s, init_checkpoint, model_preset, vocab_size, image_token_id)
        if self.sharded:  # the stage's own attention mode and RoPE against the mesh too
            from keye.train import sharded_training

            sharded_training.check_parallel(self.par, self.world, model.config)
        if self.latest is not None and not self.sharded:  # sharded: loaded into the shards by resume()
            _load_weights(model, self.latest[1] / "model")
        apply_trainable(model, s.trainable or "all", s.attention_mode or "dense")
        model.to(self.acc.device)
        if self.sharded:
            from keye.train import sharded_training

            self.mesh = sharded_training.shard(
                model, self.par, self.shape, self.acc.device, bf16=not self.want_cpu
            )
        optimizer = torch.optim.AdamW(
            param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, foreach=False
        )
        self.model = model
        if self.sharded:
            self.wrapped, self.optimizer = model, optimizer
        else:
            self.wrapped, self.optimizer = self.acc.prepare(model, optimizer)
        self.inner_opt = getattr(self.optimizer, "optimizer", self.optimizer)
        self.scheduler = build_scheduler(
            self.inner_opt, s.steps, s.warmup_steps, s.schedule, s.min_lr_ratio, s.decay_fraction
        )
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.peak = s.peak_flops or (None if self.want_cpu else H200_BF16_PEAK)
        self.probe_mode = s.attention_mode != "dense"

    def _open_data(self, pack_index: Path, shards: Mapping[str, str] | Path) -> None:
        s = self.settings
        self.tok = load_tokenizer(self.tokenizer_dir)
        self.pad_id = int(self.tok.pad_id)
        self.image_id = self.model.config.image_token_id
        if isinstance(
            shards, Mapping
        ):  # the index names shards by stem or by file name: accept both spellings
            shards = {
                **{k.removesuffix(".tar"): str(v) for k, v in shards.items()},
                **{k: str(v) for k, v in shards.items()},
            }
        index = read_pack_index(pack_index)
        pack_ids = index.column("pack_id").to_numpy()
        n_packs = max(1, int(pack_ids.max()) + 1 if pack_ids.size else 0)
        mean_pack = float(np.asarray(index.column("tokens").to_numpy(), np.float64).sum()) / n_packs
        if self.sharded:
            # the global batch is packs_per_step packs (world-independent: positions [s P, (s+1) P) of the
            # epoch's order, see keye.data.loader.rank_packs), dealt over the dp_shard x ep data-parallel ranks;
            # the cp ranks of a group read the same packs
            dp = self.shape.data_parallel
            self.packs_per_step = dp * max(1, round(s.tokens_per_step / max(mean_pack, 1.0) / dp))
            self.accum = self.packs_per_step // dp
            rank, world, unit = self.mesh.dp_rank, dp, self.packs_per_step
        else:
            self.accum = max(1, round(s.tokens_per_step / (self.world * max(mean_pack, 1.0))))
            rank, world, unit = self.rank, self.world, None
        self.loader = open_loader(
            pack_index,
            shards,
            self.tok,
            self.policy,
            rank=rank,
            world_size=world,
            num_workers=s.num_workers,
            seed=s.seed,
            shuffle=s.shuffle,
            skip_empty=self.world == 1 and not self.sharded,
            unit=unit,
        )

    def resume(self) -> int | None:
        """Restore optimizer, schedule, loader cursor, RNG and step from the newest step checkpoint, if any."""
        if self.latest is None:
            return None
        if self.sharded:
            from keye.train import sharded_training

            state = sharded_training.load(self.latest[1], self.wrapped, self.inner_opt)
            self.loader.load_state_dict(self._dealt_cursor(state))
        else:
            state = ckpt.read_trainer_state(self.latest[1])
            optim_state, rng = ckpt.read_rank_files(self.latest[1], self.rank)
            self.inner_opt.load_state_dict(optim_state)
            self.loader.load_state_dict(state["loader"][self.rank])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sharded:
            sharded_training.restore_rng(self.latest[1])
        else:
            ckpt.set_rng_state(rng)
        self.step_no = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        if self.acc.is_main_process:
            print(
                f"[train {self.settings.name}] resuming from {self.latest[1]} (step {self.step_no})",
                flush=True,
            )
        return self.latest[0]

    def _dealt_cursor(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's loader cursor from a sharded checkpoint written on any mesh: its own when the data-parallel
        degree is the same, else the saved cursors re-dealt (keye.data.loader.redeal: the run continues with
        exactly the packs, and the packs per step, of the uninterrupted run)."""
        from keye.data.loader import redeal

        saved = int(state.get("packs_per_step", self.packs_per_step))
        if saved != self.packs_per_step:
            raise ValueError(
                f"{self.latest[1]} was written with {saved} packs per step, this mesh "
                f"({self.shape.describe()}) takes {self.packs_per_step}: the batch would change. Resume on a "
                f"data-parallel degree (dp_shard x ep) dividing {saved}, or keep tokens_per_step"
            )
        states, dp = state["loader"], self.shape.data_parallel
        if all(int(st["world_size"]) == dp for st in states):
            return next(st for st in states if int(st["rank"]) == self.mesh.dp_rank)
        return redeal(states, self.mesh.dp_rank, dp, self.packs_per_step)

    def run(self) -> TrainResult:
        done = self.finished()
        if done is not None:
            return done
        resumed = self.resume()
        self.stream = pack_stream(self.loader)
        s = self.settings
        while self.step_no < s.steps:
            self.step()
            if self.log_fn is not None and (self.step_no % s.log_every == 0 or self.step_no == s.steps):
                self.log_fn(dict(self.last), self.step_no)
            if self.step_no % s.checkpoint_every == 0 or self.step_no == s.steps:
                self.save()
        self.export()
        return TrainResult(self.final_dir, self.step_no, dict(self.last), resumed)

    def _micro_batches(self) -> tuple[list[tuple[PackedBatch, Tensor, int, Any]], float]:
        """The packs of one step with their stage labels and target counts (under cp: this rank's rows' targets,
        with the padded inputs and the CPContext), and the global target count."""
        micro = []
        cp = self.shape.cp if self.sharded else 1
        seq_mean, samples = self.settings.loss_agg_mode == "seq-mean-token-mean", 0
        for _ in range(self.accum):
            b = next(self.stream)
            labels = stage_labels(b, self.settings, self.image_id, self.loader.stream.epoch)
            if cp > 1:
                inputs, cpc = _cp_inputs(_micro_inputs(b, labels, self.pad_id, torch.device("cpu")), self)
                targets = shifted_targets(inputs["labels"], inputs["cu_seqlens"])[cpc.rows]
                micro.append((b, labels, int((targets != -100).sum()), (inputs, cpc)))
                continue
            n = 0
            if b.sample_ids:
                targets = shifted_targets(labels, b.cu_seqlens)
                n = int((targets != -100).sum())
                if seq_mean:  # the unit seq-mean-token-mean averages over: samples with a target
                    samples += int(torch.unique(_target_samples(targets, b.cu_seqlens)).numel())
            micro.append((b, labels, n, None))
        counts = torch.tensor(
            [float(sum(m[2] for m in micro)), float(samples)], dtype=torch.float64, device=self.acc.device
        )
        if self.world > 1:
            dist.all_reduce(counts)
        self.global_samples = max(1.0, float(counts[1]))
        return micro, max(1.0, float(counts[0]))

    def _forward_backward(
        self, micro: list[tuple[PackedBatch, Tensor, int, Any]], global_n: float
    ) -> _StepTotals:
        """Accumulate the gradients of the micro-batches: the loss is the mean over ALL target tokens of the
        global batch (see the module docstring); per-task losses come from the returned hidden states."""
        acc, model, world = self.acc, self.model, self.world
        cp = self.shape.cp if self.sharded else 1
        tot = _StepTotals(torch.zeros(4, dtype=torch.float64, device=acc.device))
        for i, (b, labels, n, cp_in) in enumerate(micro):
            if cp_in is not None:  # context parallel: this rank's rows of the padded pack
                from keye.model.context_parallel import set_context

                inputs = {k: v.to(acc.device, non_blocking=True) for k, v in cp_in[0].items()}
                set_context(model, cp_in[1])
            else:
                inputs = _micro_inputs(b, labels, self.pad_id, acc.device)
            sync = i == len(micro) - 1
            if self.sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
                self.wrapped.set_requires_gradient_sync(sync)
            with acc.no_sync(self.wrapped) if (world > 1 and not sync and not self.sharded) else _null():
                if self.settings.loss_agg_mode == "seq-mean-token-mean" and "labels" in inputs:
                    out = self.wrapped(
                        **{k: v for k, v in inputs.items() if k != "labels"}, return_logits=False
                    )
                    out.lm_loss, lm_obj = _seq_mean_losses(out.hidden, model, inputs)
                    lm_obj = lm_obj * (world / self.global_samples)
                else:
                    out = self.wrapped(**inputs)
                    lm_obj = out.lm_loss * (n * world / global_n)
                aux_t = out.aux_loss if out.aux_loss is not None else out.lm_loss * 0
                idx_t = out.indexer_loss if out.indexer_loss is not None else out.lm_loss * 0
                idx_t = idx_t * cp if cp > 1 else idx_t  # each cp rank holds its share of the pack's KL
                coef = model.config.lm.router_aux_loss_coef
                loss = lm_obj + (coef * aux_t + idx_t) / len(micro)
                if not loss.requires_grad:  # e.g. a text-only pack in a projector-only stage
                    loss = loss + sum(p.reshape(-1)[0] * 0.0 for p in self.params)
                loss.backward() if self.sharded else acc.backward(loss)
            n_inputs = torch.tensor(
                float(inputs["input_ids"].shape[0]), dtype=torch.float64, device=acc.device
            )
            tot.sums += torch.stack(
                [
                    out.lm_loss.detach().double() * n,
                    aux_t.detach().double(),
                    idx_t.detach().double(),
                    n_inputs,
                ]
            )
            ec = out.expert_counts.detach()
            tot.expert_counts = ec if tot.expert_counts is None else tot.expert_counts + ec
            if b.sample_ids:
                tot.lengths.extend(torch.diff(b.cu_seqlens).tolist())
                if self.step_no % self.settings.log_every == 0 and world == 1 and not self.sharded:
                    _task_losses(out.hidden.detach(), model, inputs, b, tot.task_sum)
            probe = self.probe_mode and not self.sharded  # the probe reads whole weights (not shards)
            if probe and self.step_no % self.settings.probe_every == 0 and i == 0 and b.sample_ids:
                self.last["dsa_topk_mass_share"] = _probe_topk_share(model, inputs)
        if cp > 1:
            from keye.model.context_parallel import set_context

            set_context(model, None)
        if self.sharded:
            from keye.train import sharded_training

            sharded_training.scale_expert_grads(model, self.shape.ep)
        if world > 1:
            dist.all_reduce(tot.sums)
            dist.all_reduce(tot.expert_counts)
        return tot

    def _apply(self, lm_loss: float, grad_norm: float, tot: _StepTotals) -> None:
        """The optimizer update, or (a non-finite loss or gradient) the NaN policy: skip it, or stop."""
        s = self.settings
        if math.isfinite(lm_loss) and math.isfinite(grad_norm) and math.isfinite(float(tot.sums[2])):
            self.optimizer.step()
            self.consecutive_bad = 0
            if s.moe_balance == "bias" and s.bias_rate > 0 and tot.expert_counts is not None:
                for li, layer in enumerate(self.model.lm.layers):
                    layer.mlp.update_router_bias(tot.expert_counts[li], s.bias_rate)
            return
        self.consecutive_bad += 1
        self.bad_steps += 1
        msg = (
            f"[train {s.name}] non-finite step {self.step_no}: lm_loss={lm_loss} grad_norm={grad_norm}; "
            f"update skipped ({self.consecutive_bad} in a row)"
        )
        if s.nan_policy == "stop" or self.consecutive_bad >= s.max_bad_steps:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(msg + "; stopping (no checkpoint written for this step)")
        if self.acc.is_main_process:
            print(msg, flush=True)

    def step(self) -> None:
        """One optimizer step; its metrics are in self.last."""
        t0 = time.perf_counter()
        micro, global_n = self._micro_batches()
        tot = self._forward_backward(micro, global_n)
        if self.sharded:
            from keye.train import sharded_training

            grad_norm = sharded_training.clip_grad_norm(self.params, self.settings.grad_clip)
        else:
            grad_norm = self.acc.clip_grad_norm_(self.params, self.settings.grad_clip)
        gn = float(grad_norm) if grad_norm is not None else 0.0
        lm_loss = float(tot.sums[0]) / global_n
        self._apply(lm_loss, gn, tot)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a skipped update still advances the schedule (by design)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step_no += 1
        self.log(tot, lm_loss, gn, lr, global_n, len(micro) * self.world, time.perf_counter() - t0)

    def log(
        self, tot: _StepTotals, lm_loss: float, gn: float, lr: float, global_n: float, n_mb: int, dt: float
    ) -> None:
        """The step's metrics into self.last (what log_metrics receives and the step checkpoint keeps)."""
        lm = self.model.config.lm
        sums, last = tot.sums, self.last
        cp = self.shape.cp if self.sharded else 1  # the cp ranks of a group hold the same packs
        flops = training_flops(lm, tot.lengths) * self.world / cp if tot.lengths else 0.0
        last.update(
            {
                "loss": lm_loss + (float(sums[1]) * lm.router_aux_loss_coef + float(sums[2])) / n_mb,
                "lm_loss": lm_loss,
                "aux_loss": float(sums[1]) / n_mb,
                "lr": lr,
                "grad_norm": gn,
                "tokens_per_s": float(sums[3]) / dt,
                "target_tokens": global_n,
                "step_time_s": dt,
                "skipped_steps": float(self.bad_steps),
                **(expert_load(tot.expert_counts) if tot.expert_counts is not None else {}),
            }
        )
        if self.probe_mode:
            last["indexer_kl"] = float(sums[2]) / n_mb
        if self.peak is not None and flops:
            last["mfu"] = mfu(flops, dt, self.peak, self.world)
        for key in [k for k in last if k.startswith("loss/")]:
            del last[key]
        for task, (s, c) in tot.task_sum.items():
            last[f"loss/{task}"] = s / max(c, 1.0)

    def save(self) -> None:
        """A step checkpoint (atomic; the newest keep_last kept). Sharded: written asynchronously, committed by
        the next save or the export."""
        if self.sharded:
            from keye.train import sharded_training

            self.wait_for_save()
            if not sharded_training.all_finite(self.model):
                raise NonFiniteLoss(
                    f"[train {self.settings.name}] weights are not finite at step {self.step_no}; checkpoint not written"
                )
            state = _trainer_extra(self)
            self.pending_save = sharded_training.save(
                ckpt.step_dir(self.out_dir, self.step_no), self.wrapped, self.inner_opt, state, self.settings
            )
            return
        _save_step(
            self.acc,
            self.wrapped,
            self.model,
            self.inner_opt,
            self.scheduler,
            self.loader,
            self.out_dir,
            self.step_no,
            self.settings,
            self.last,
            self.bad_steps,
        )

    def wait_for_save(self) -> None:
        """Finish the asynchronous step checkpoint in flight (commit it, prune old ones)."""
        if self.pending_save is not None:
            self.pending_save.wait()
            if self.acc.is_main_process:
                ckpt.prune(self.out_dir, self.settings.keep_last)
            self.pending_save = None

    def export(self) -> None:
        """final/: weights + tokenizer + frame policy, what keye.eval.keye_predict_fn loads (written once, here)."""
        if self.sharded:
            from keye.model.checkpoint import TIED_KEY, save_state
            from keye.train.sharded_checkpoint import full_state

            self.wait_for_save()
            state = full_state(self.wrapped)  # every rank takes part; rank 0 gets the whole weights
            if self.acc.is_main_process:
                if self.model.config.lm.tie_word_embeddings:
                    state.pop(TIED_KEY, None)
                with atomic_dir(self.final_dir) as build:
                    save_state(state, self.model.config, build)
                    bundle_checkpoint(build, self.tokenizer_dir, self.policy, tok=self.tok)
            self.acc.wait_for_everyone()
            return
        if self.acc.is_main_process:
            with atomic_dir(self.final_dir) as build:
                save_checkpoint(self.acc.unwrap_model(self.wrapped), build)
                bundle_checkpoint(build, self.tokenizer_dir, self.policy, tok=self.tok)
        self.acc.wait_for_everyone()


def train_stage(settings: StageSettings, **kwargs: Any) -> TrainResult:
    """Train one stage into out_dir (step-N/ checkpoints, final/ model). Re-running with the same out_dir resumes
    from the newest complete step checkpoint; a finished stage returns at once. Keywords: Trainer's; see
    keye/train/__init__.py."""
    return Trainer(settings, **kwargs).run()


def _is_sharded(step_dir: Path) -> bool:
    from keye.train.sharded_checkpoint import is_sharded

    return is_sharded(step_dir)


def _trainer_state(step_dir: Path) -> dict[str, Any]:
    """trainer.safetensors of a step checkpoint, or the `extra` of a sharded (DCP) one."""
    from keye.train.sharded_checkpoint import is_sharded, read_extra

    return read_extra(step_dir) if is_sharded(step_dir) else ckpt.read_trainer_state(step_dir)


def _trainer_extra(tr: Trainer) -> dict[str, Any]:
    """What a sharded step checkpoint keeps beside the shards (trainer.safetensors' content)."""
    gathered: list[Any] = [None] * tr.world
    dist.all_gather_object(gathered, tr.loader.state_dict())
    return {
        "step": tr.step_no,
        "scheduler": tr.scheduler.state_dict(),
        "loader": gathered,
        "packs_per_step": tr.packs_per_step,
        "bad_steps": tr.bad_steps,
        "last_metrics": without_timings(tr.last),
        "settings": tr.settings.model_dump(mode="json"),
    }


def _cp_inputs(inputs: dict[str, Tensor], tr: Trainer) -> tuple[dict[str, Tensor], Any]:
    """A pack's inputs padded with one no-loss sample to a multiple of 2 * cp rows, and this rank's CPContext
    (load-balanced chunks, keye.model.context_parallel)."""
    from keye.model.context_parallel import CPContext, pad_rows

    t = int(inputs["input_ids"].shape[0])
    pad = pad_rows(t, tr.shape.cp)
    if pad:
        ids = inputs["input_ids"]
        inputs = {
            **inputs,
            "input_ids": torch.cat([ids, ids.new_full((pad,), tr.pad_id)]),
            "labels": torch.cat([inputs["labels"], ids.new_full((pad,), -100)]),
            "position_ids": torch.cat(
                [inputs["position_ids"], torch.arange(pad, dtype=torch.int64).expand(3, -1)], dim=1
            ),
            "cu_seqlens": torch.cat([inputs["cu_seqlens"], inputs["cu_seqlens"].new_tensor([t + pad])]),
        }
    return inputs, CPContext.balanced(inputs["cu_seqlens"], tr.mesh.cp.get_group(), valid=t)


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
            "last_metrics": without_timings(last),
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
    if dist.is_available() and dist.is_initialized():
        # every rank done before any tears the group down, then out without interpreter finalisation: a gloo
        # worker thread still holding a tensor then aborts the process ("terminate called without an active
        # exception", pytorch/pytorch#179291) after all the work is safely on disk
        dist.barrier()
        dist.destroy_process_group()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
