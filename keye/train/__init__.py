"""Staged training of Keye-VL (issue 6): align -> pretrain -> multitask -> long (DSA warm-up, then sparse) -> sft.

Public API (the orchestrator wires MLflow, lineage and Prefect around it; nothing here imports them):

    from keye.train import StageSettings, TrainResult, Trainer, train_stage
    settings = StageSettings(name="sft", kind="sft", steps=80, lr=1e-3, tokens_per_step=4096)
    res = train_stage(
        settings, *, init_checkpoint: str | Path | None, model_preset: str, vocab_size: int | None,
        image_token_id: int | None, pack_index: Path, shards: dict[str, str] | Path, tokenizer_dir: Path,
        policy: SamplingPolicy, out_dir: Path,
        log_metrics: Callable[[dict[str, float], int], None] | None = None, device: str | None = None,
        parallel: dict | None = None,  # train.parallel; on several ranks: FSDP2 + sharded DCP step checkpoints
    ) -> TrainResult(checkpoint_dir=out_dir/"final", steps, metrics (last logged), resumed_from_step)

- StageSettings (keye.train.settings): one stage recipe as data; `kind` fills trainable / attention_mode /
  answer_only_loss unless given (align: projector, dense; pretrain: all, loss on all text; multitask: all;
  long_warmup: indexer only, dsa_warmup, KL loss; long_sparse: all, dsa, indexer detached; sft: answer-only).
  `settings.tasks()` lists the tasks to pack (task_weights > 0; None = all). The default pipeline's tiny recipes
  are in pipelines.yaml (train.stages).
- Trainer (keye.train.trainer): the loop as methods a reader can follow: resume, step, log, save, export.
- Resume: automatic when out_dir holds step-N/ checkpoints (model, optimizer, scheduler, RNG, loader cursor,
  step; atomic; newest `keep_last` kept). A finished stage (final/ present, last step == steps) returns at once.
- Metrics per step (log_metrics(metrics, step), main process only): loss, lm_loss, aux_loss, loss/<task>, lr,
  grad_norm, tokens_per_s, mfu (CUDA, or when peak_flops is set), expert_load_max_over_mean,
  expert_load_mean_ratio, indexer_kl and dsa_topk_mass_share (DSA stages), skipped_steps, step_time_s.
- NaN/inf: nan_policy="skip" drops the update (and counts it), "stop" raises NonFiniteLoss; weights that are not
  finite are never checkpointed.
- Distributed: `accelerate launch -m keye.train.trainer SPEC.json` or `torchrun ... -m keye.train.trainer SPEC.json`
  (docs/TRAINING.md). Metrics helpers (FLOPs, MFU, expert load, top-k mass): keye.train.metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keye.train.settings import StageSettings
    from keye.train.trainer import NonFiniteLoss, Trainer, TrainResult, train_stage

_LAZY = {
    "StageSettings": "keye.train.settings",
    "Trainer": "keye.train.trainer",
    "TrainResult": "keye.train.trainer",
    "NonFiniteLoss": "keye.train.trainer",
    "train_stage": "keye.train.trainer",
}


def __getattr__(name: str) -> Any:  # lazy: keye.train.metrics must import on a bare GPU box (torch only)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["NonFiniteLoss", "StageSettings", "TrainResult", "Trainer", "train_stage"]
