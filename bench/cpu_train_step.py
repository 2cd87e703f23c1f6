"""The default pipeline's SFT step on CPU (the tiny preset, its real packs): seconds per optimizer step with the
attention as it is now against the per-sample slicing it replaced, in one run, from the same start and data.

Why: SFT is the biggest stage of the 2-core default pipeline (800 steps). The dense SDPA path and the ViT used to
slice each sample / frame out of the packed tensors; the backward of each slice zero-fills a full-size gradient.
Both forms give bit-identical weights (tests/unit/kernels/test_kernels_dense_sdpa.py,
tests/unit/model/test_vit_attention_by_size.py); this bench checks that again (the two runs' final losses and
weights) and times them.

  python bench/cpu_train_step.py --workspace WS [--config pipelines.yaml --warm 160 --steps 40 --threads 2]

WS: a workspace after `keye run pipelines.yaml` (its sft checkpoint is the start, its PackSet the data). The first
`--warm` steps (one epoch of packs: the loader's frame cache fills) are not timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from keye.core.config import load_config
from keye.core.lineage import Lineage
from keye.data.tokenizer import load_tokenizer
from keye.kernels import dispatch
from keye.kernels.dense_sdpa import dense_attention_sdpa_per_sample
from keye.model import vit
from keye.train.trainer import Trainer, pack_stream


def run(ws: Path, args: argparse.Namespace, out: Path) -> dict:
    cfg = load_config(args.config)
    recipe = next(s for s in cfg.train.stages if s.kind == "sft")
    recipe = recipe.model_copy(update={"steps": 10**6, "checkpoint_every": 10**9, "log_every": 10**9})
    store = Lineage(ws, read_only=True)
    init = store.query("SELECT path FROM checkpoints WHERE stage = 'sft' ORDER BY created_at DESC LIMIT 1")[0]
    packset = store.latest_artifact("packset")
    meta = json.loads(store.artifact(packset)["meta"] or "{}")
    shards = {Path(r["path"]).stem: r["path"] for r in store.shards(store.input_of_kind(packset, "shardset"))}
    del store
    tok = load_tokenizer(meta["tokenizer_dir"])
    tasks = sorted(recipe.tasks())
    index = ws / "packs" / packset / ("tasks-" + "-".join(tasks)) / "packs.parquet"
    if not index.is_file():
        index = ws / "packs" / packset / "packs.parquet"
    tr = Trainer(
        recipe, init_checkpoint=init["path"], model_preset=cfg.train.preset, vocab_size=len(tok),
        image_token_id=tok.image_id, pack_index=index, shards=shards, tokenizer_dir=Path(meta["tokenizer_dir"]),
        policy=cfg.sampling, out_dir=out, device="cpu",
    )  # fmt: skip
    tr.stream = pack_stream(tr.loader)
    for _ in range(args.warm):
        tr.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tr.step()
    dt = (time.perf_counter() - t0) / args.steps
    digest = sum(float(p.detach().double().sum()) for p in tr.model.parameters())
    return {"s_per_step": dt, "lm_loss": tr.last.get("lm_loss"), "weights_sum": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument(
        "--config", default="pipelines.yaml", help="the pipeline file the workspace was made with"
    )
    ap.add_argument("--warm", type=int, default=160)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cpu_train_step_"))
    rows = {}
    try:
        rows["current"] = run(args.workspace, args, tmp / "current")
        fast, by_size = dispatch._torch_fast()["dense_attention"], vit._attention_by_size
        dispatch._torch_fast()["dense_attention"] = dense_attention_sdpa_per_sample
        vit._attention_by_size = vit._attention_per_frame
        try:
            rows["sliced (before)"] = run(args.workspace, args, tmp / "sliced")
        finally:
            dispatch._torch_fast()["dense_attention"], vit._attention_by_size = fast, by_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same = rows["current"]["weights_sum"] == rows["sliced (before)"]["weights_sum"]
    print(json.dumps({"threads": args.threads, "warm": args.warm, "steps": args.steps, **rows,
                      "identical_weights": same,
                      "speedup": rows["sliced (before)"]["s_per_step"] / rows["current"]["s_per_step"]},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
