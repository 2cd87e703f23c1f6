"""Overlap and locality of the top-k selections a trained DSA indexer makes (issue 20): loads a checkpoint (e.g. the
default pipeline's long_warmup / long_sparse stage output), runs its LM in `dsa` mode over a packed batch and
reports keye.kernels.selections.selection_stats per layer: mean adjacent Jaccard (what the block-union path needs),
local-window and sink shares, mean distance. These are the figures to pick the synthetic overlap level of
bench/dsa_blocks.py that matches a trained model.

  python bench/dsa_selection_stats.py --ckpt CKPT_DIR [--ids ids.pt] [--lengths 4096,2048] [--topk K] [--out F]

--ids: a 1-D tensor of token ids saved with torch.save (e.g. a packed training sample); without it, random ids
(an untrained-looking input: report which one was used). --lengths packs the ids into samples (default: one).
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
from keye.kernels.selections import selection_stats  # noqa: E402
from keye.model.checkpoint import load_checkpoint  # noqa: E402


def measure(model, ids: torch.Tensor, cu: torch.Tensor, topk: int | None = None) -> list[dict]:
    """selection_stats of every dsa layer's selection on (ids, cu) (token sets; block sets expanded per token)."""
    cfg = model.config.lm
    if topk is not None:
        cfg.dsa.topk = topk
    model.set_attention_mode("dsa")
    rows: list[dict] = []
    orig_tok, orig_blk = dispatch.indexer_topk, dispatch.block_topk

    def tok(*a, **k):
        idx, sc = orig_tok(*a, **k)
        rows.append({"layer": len(rows), "selection": "token", **selection_stats(idx, a[3])})
        return idx, sc

    def blk(*a, **k):
        bidx, bstart = orig_blk(*a, **k)
        per_token = expand_block_indices(bidx, bstart, a[0].shape[0])
        rows.append({"layer": len(rows), "selection": "block", **selection_stats(per_token, a[3])})
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
            model(input_ids=ids, cu_seqlens=cu)
    finally:
        dispatch.indexer_topk, dispatch.block_topk = orig_tok, orig_blk
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--ids", default="")
    ap.add_argument("--lengths", default="")
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else None
    model = load_checkpoint(args.ckpt, device=args.device, dtype=dtype)
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
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=args.device)
    rows = measure(model, ids.to(args.device), cu, args.topk)
    for r in rows:
        r.update(ckpt=args.ckpt, input=source, lengths=lengths)
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
