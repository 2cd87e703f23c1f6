"""One rank of the trainer-on-a-mesh tests (tests/unit/train/test_train_mesh.py; RANK/WORLD_SIZE/MASTER_* set,
gloo, CPU, float32, one thread).

    python trainer_worker.py SPEC.json   -> SPEC["out"] (rank 0): {case name: {"lm_loss", "aux_loss", ...}}

SPEC["cases"] is a list of {"name", "spec": a trainer spec (tests/unit/train/test_train_data.write_train_spec's
JSON), "grads": a safetensors path}; every case builds the real Trainer (its `parallel` from the spec: FSDP2, EP,
CP, ViT apart) and runs the first optimizer step's forward/backward (Trainer._micro_batches and
_forward_backward: gradient accumulation, loss scaling, expert-gradient scaling), then gathers every gradient
whole (DTensor.full_tensor) and the step's loss sums. All the cases run in one process group, one after another.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from keye.data.sampling import SamplingPolicy
from keye.train.settings import StageSettings
from keye.train.trainer import Trainer, pack_stream


def run_case(case: dict) -> dict:
    from safetensors.torch import save_file

    spec = dict(case["spec"])
    settings = StageSettings(**spec.pop("settings"))
    spec["policy"] = SamplingPolicy(**spec["policy"])
    for key in ("pack_index", "tokenizer_dir", "out_dir"):
        spec[key] = Path(spec[key])
    tr = Trainer(settings, **spec)
    tr.resume()
    tr.stream = pack_stream(tr.loader)
    micro, global_n = tr._micro_batches()
    tot = tr._forward_backward(micro, global_n)
    grads = {}
    for name, p in tr.model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().contiguous().clone()
    n_mb = len(micro) * tr.world
    result = {
        "lm_loss": float(tot.sums[0]) / global_n,
        "aux_loss": float(tot.sums[1]) / n_mb,
        "indexer_loss": float(tot.sums[2]) / n_mb,  # the trainer's indexer_kl
        "target_tokens": global_n,
        "expert_counts": tot.expert_counts.tolist(),
        "packs": sorted(int(b.pack_id) for b, *_ in micro),
        "micro_batches": len(micro),
    }
    if dist.is_initialized() and tr.world > 1:
        every: list = [None] * tr.world
        dist.all_gather_object(every, result["packs"])
        result["packs"] = sorted({p for ps in every for p in ps})
    if tr.rank == 0:
        save_file(grads, case["grads"])
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    out = {c["name"]: run_case(c) for c in spec["cases"]}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()  # exit without interpreter finalisation: see dist_worker.leave
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
