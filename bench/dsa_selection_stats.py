"""Overlap and locality of the top-k selections a trained DSA indexer makes (issue 20): loads a checkpoint (e.g. the
default pipeline's long_warmup / long_sparse stage output), runs its LM in `dsa` mode over a packed batch and
reports keye.kernels.selections.selection_stats per layer: mean adjacent Jaccard (what the block-union path needs),
local-window and sink shares, mean distance. These are the figures to pick the synthetic overlap level of
bench/dsa_blocks.py that matches a trained model.

  python bench/dsa_selection_stats.py --ckpt CKPT_DIR [--ids ids.pt] [--lengths 4096,2048] [--topk K] [--out F]
  python bench/dsa_selection_stats.py --ckpt CKPT_DIR --pack WS/packs/ID/packs.parquet --shards WS/shards/ID
      [--packs 8] [--window 8 --sink 4] [--selection token|block]

--ids: a 1-D tensor of token ids saved with torch.save (e.g. a packed training sample); without it, random ids
(an untrained-looking input: report which one was used). --lengths packs the ids into samples (default: one).
--pack: real training packs (frames included) read with the checkpoint's own tokenizer and frame policy; the figures
are means over --packs packs. Each layer's row comes with `random_*`: the same stats of uniformly random sets of the
same sizes on the same samples (`random_sets`: distinct keys drawn uniformly from each token's window).
--window / --sink: the local window (default 256 = k/8 at k 2048) and sink size of the shares.
--selection: measure the other mode's sets with the same indexer (default: the checkpoint's mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keye.kernels import dispatch  # noqa: E402
from keye.kernels.block_selection import expand_block_indices  # noqa: E402
from keye.kernels.dsa_reference import topk_lowest_index_ties  # noqa: E402
from keye.kernels.selections import selection_stats  # noqa: E402
from keye.model.checkpoint import load_checkpoint  # noqa: E402


def random_sets(cu: torch.Tensor, topk: int, seed: int = 0) -> torch.Tensor:
    """int32 [T, topk]: per token, min(topk, visible) distinct keys of its sample drawn uniformly (the top-k of
    random scores over its causal window), ascending, -1 padded: the no-structure baseline of the same set sizes."""
    dev = cu.device
    g = torch.Generator(device=dev).manual_seed(seed)
    cu_h = [int(x) for x in cu.tolist()]
    out = torch.full((cu_h[-1], topk), -1, dtype=torch.int32, device=dev)
    for a, b in zip(cu_h[:-1], cu_h[1:], strict=True):
        n = b - a
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).triu(1)
        scores = torch.rand((n, n), generator=g, device=dev).masked_fill(causal, -torch.inf)
        vals, cols = topk_lowest_index_ties(scores, topk)
        out[a:b] = torch.where(torch.isfinite(vals), cols + a, -1).to(torch.int32)
    return out


def measure(
    model,
    ids: torch.Tensor,
    cu: torch.Tensor,
    topk: int | None = None,
    extra: dict | None = None,
    window: int = 256,
    sink: int = 16,
) -> list[dict]:
    """selection_stats of every dsa layer's selection on (ids, cu) (token sets; block sets expanded per token), with
    the stats of uniformly random sets of the same sizes on the same samples (`random_*`, `random_sets`). `extra`: more model inputs (the
    frames of a real pack: position_ids, pixel_patches, patch_grids, vision_cu_seqlens)."""
    cfg = model.config.lm
    if topk is not None:
        cfg.dsa.topk = topk
    model.set_attention_mode("dsa")
    rows: list[dict] = []
    orig_tok, orig_blk = dispatch.indexer_topk, dispatch.block_topk

    base: dict = {}

    def record(per_token: torch.Tensor, selection: str) -> None:
        c = cu.to(per_token.device)
        if not base:  # the same samples and set sizes in every layer: one baseline
            base.update(selection_stats(random_sets(c, cfg.dsa.topk), c, window, sink))
        row = {"layer": len(rows), "selection": selection, **selection_stats(per_token, c, window, sink)}
        rows.append({**row, **{f"random_{k}": v for k, v in base.items()}})

    def tok(*a, **k):
        idx, sc = orig_tok(*a, **k)
        record(idx, "token")
        return idx, sc

    def blk(*a, **k):
        bidx, bstart = orig_blk(*a, **k)
        record(expand_block_indices(bidx, bstart, a[0].shape[0]), "block")
        return bidx, bstart

    dispatch.indexer_topk, dispatch.block_topk = tok, blk
    try:
        with torch.no_grad():
            model.eval()
            for (
                m
            ) in model.modules():  # the selection runs in eval only where the KL is forced or topk < length
                if hasattr(m, "force_indexer_loss"):
                    m.force_indexer_loss = True
            model(input_ids=ids, cu_seqlens=cu, **(extra or {}))
    finally:
        dispatch.indexer_topk, dispatch.block_topk = orig_tok, orig_blk
    return rows


def real_packs(ckpt: str, pack: str, shards: str, n: int, device: str):
    """Up to n packed training batches (ids, cu_seqlens, other model inputs) with the checkpoint's tokenizer and
    frame policy, in pack-index order."""
    from pathlib import Path

    from keye.data.loader import open_loader
    from keye.data.sampling import SamplingPolicy
    from keye.data.tokenizer import load_tokenizer
    from keye.train.bundle import POLICY_FILE

    tok = load_tokenizer(ckpt)
    policy = SamplingPolicy.model_validate_json((Path(ckpt) / POLICY_FILE).read_text())
    for i, batch in enumerate(open_loader(pack, shards, tok, policy)):
        if i >= n:
            break
        inputs = {k: v.to(device) for k, v in batch.model_inputs().items() if k != "labels"}
        yield inputs.pop("input_ids"), inputs.pop("cu_seqlens"), inputs


def mean_rows(per_pack: list[list[dict]]) -> list[dict]:
    """Per layer, the mean of each number over the packs."""
    out = []
    for layer_rows in zip(*per_pack, strict=True):
        row = dict(layer_rows[0])
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = sum(r[k] for r in layer_rows) / len(layer_rows)
        out.append({**row, "packs": len(layer_rows)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--ids", default="")
    ap.add_argument("--lengths", default="")
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    ap.add_argument("--pack", default="", help="a pack index (packs.parquet) of real training packs")
    ap.add_argument("--shards", default="", help="the shard directory of --pack")
    ap.add_argument("--packs", type=int, default=8)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--selection", choices=("token", "block"), default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else None
    model = load_checkpoint(args.ckpt, device=args.device, dtype=dtype)
    if args.selection:
        model.config.lm.dsa.selection = args.selection
    kw = {"window": args.window, "sink": args.sink}
    if args.pack:
        per_pack = [
            measure(model, ids, cu, args.topk, extra, **kw)
            for ids, cu, extra in real_packs(args.ckpt, args.pack, args.shards, args.packs, args.device)
        ]
        rows, source, lengths = mean_rows(per_pack), f"{len(per_pack)} packs of {args.pack}", []
    else:
        vocab = model.config.lm.vocab_size
        lengths = [int(x) for x in args.lengths.split(",") if x]
        if args.ids:
            ids = torch.load(args.ids).flatten().long()
            source = args.ids
        else:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab - 1, (sum(lengths) or 4096,), generator=g)
            source = "random ids"
        lengths = lengths or [ids.numel()]
        if sum(lengths) != ids.numel():
            raise SystemExit(f"--lengths sum to {sum(lengths)} but --ids holds {ids.numel()} tokens")
        cu = torch.tensor(
            [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=args.device
        )
        rows = measure(model, ids.to(args.device), cu, args.topk, **kw)
    for r in rows:
        r.update(ckpt=args.ckpt, input=source, lengths=lengths, window=args.window, sink=args.sink)
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
