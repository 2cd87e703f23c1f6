"""What block-shared DSA selection costs in quality: the `small` preset trained the same steps, same data, same
seed, with `dsa.selection` token vs block (and a dense continuation as the upper bound), LM loss and indexer KL
per step side by side, then held-out losses.

Protocol (as the pipeline's long stages, shortened): one shared prefix from seed 0 -- a dense `pretrain` phase (all
parameters but the indexer) and a `dsa_warmup` phase (indexer only, KL to the dense attention) -- then three
branches from the same weights, each a `long_sparse` phase (everything trains; `dsa` mode, indexer input detached,
LM + indexer KL) on the identical batch sequence: dense, dsa token, dsa block. Held-out: fresh sequences of the
same generator (another seed), evaluated in each branch's own attention mode, KL computed in eval mode.

Data (no files needed, so it runs on a bare GPU box): sequences of `--seq-len` tokens over a `--vocab` vocabulary
built from a fixed lexicon of multi-token "words" drawn Zipf-like (local structure a model learns fast), where from
position `--copy-min-dist` on, each span of `--span` tokens is, with probability 1/2, a verbatim copy of an earlier
span at least `--copy-min-dist` tokens back (long-range retrieval that the top-k selection must find: the copy
distance is beyond the k = 2048 nearest keys). `copy_loss` is the LM loss on the copied tokens after the first
two of each span; `lm_loss` over all tokens.

  python bench/dsa_block_quality.py --out OUT_DIR                 # H200 (bf16, Triton kernels)
  python bench/dsa_block_quality.py --out OUT_DIR --cpu-smoke     # tiny preset on CPU (checks the script only)

--stats: also the trained indexer's selection shape (bench/dsa_selection_stats.py: adjacent Jaccard, local-window
and sink shares per layer, beside uniformly random sets of the same sizes) on one held-out batch, after the warm-up
(in token and in block selection) and after each sparse branch (in its own selection).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:  # checkpoint io is not used here; a bare GPU box may lack safetensors
    import safetensors  # noqa: F401
except ImportError:  # pragma: no cover
    _st = types.ModuleType("safetensors")
    _st.safe_open = None  # type: ignore[attr-defined]
    _stt = types.ModuleType("safetensors.torch")
    _stt.save_file = None  # type: ignore[attr-defined]
    _stt.load_file = None  # type: ignore[attr-defined]
    sys.modules["safetensors"], sys.modules["safetensors.torch"] = _st, _stt

from keye.kernels import dispatch  # noqa: E402
from keye.model import build_model, preset  # noqa: E402
from keye.model.lm import shifted_targets  # noqa: E402

ROWS: list[dict] = []


def log(out: str, **row: object) -> None:
    """Print a row and rewrite the JSON file (a timeout keeps what was measured)."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "dsa_block_quality.json"), "w") as f:
        json.dump(ROWS, f, indent=1)


class CopyData:
    """Deterministic batches: batch(i) depends only on (seed, i)."""

    def __init__(self, vocab: int, seq_len: int, n_seq: int, span: int, min_dist: int, seed: int) -> None:
        g = torch.Generator().manual_seed(1234)  # the lexicon is the same for every seed (train and held-out)
        self.n_words, self.max_len = 1024, 6
        self.word_len = torch.randint(2, self.max_len + 1, (self.n_words,), generator=g)
        self.words = torch.randint(1, vocab, (self.n_words, self.max_len), generator=g)
        ranks = torch.arange(1, self.n_words + 1, dtype=torch.float64)
        self.word_p = (1.0 / ranks) / (1.0 / ranks).sum()
        self.vocab, self.seq_len, self.n_seq, self.span, self.min_dist, self.seed = (
            vocab, seq_len, n_seq, span, min_dist, seed,
        )  # fmt: skip

    def _sequence(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n_w = self.seq_len // 2 + 16  # words are >= 2 tokens: enough of them
        w = torch.multinomial(self.word_p, n_w, replacement=True, generator=g)
        lens = self.word_len[w]
        keep = torch.arange(self.max_len)[None, :] < lens[:, None]
        toks = self.words[w][keep][: self.seq_len].clone()
        copy_mask = torch.zeros(self.seq_len, dtype=torch.bool)
        for s0 in range(self.min_dist, self.seq_len - self.span + 1, self.span):
            if torch.rand((), generator=g) < 0.5:
                src = int(torch.randint(0, s0 - self.min_dist + 1, (), generator=g))
                toks[s0 : s0 + self.span] = toks[src : src + self.span]
                copy_mask[s0 + 2 : s0 + self.span] = True
        return toks, copy_mask

    def batch(self, i: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        seqs = [self._sequence(g) for _ in range(self.n_seq)]
        ids = torch.cat([s[0] for s in seqs]).to(device)
        mask = torch.cat([s[1] for s in seqs]).to(device)
        cu = torch.arange(0, self.n_seq * self.seq_len + 1, self.seq_len, dtype=torch.int32, device=device)
        return ids, mask, cu


def step_losses(model, ids, copy_mask, cu) -> tuple[object, dict]:
    """Forward with labels; (model output, {lm_loss, copy_loss, indexer_kl}) as floats."""
    out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
    with torch.no_grad():
        tgt = shifted_targets(ids, cu)
        # row t predicts token t+1: it is a copy target when token t+1 is marked
        is_copy = torch.zeros_like(copy_mask)
        is_copy[:-1] = copy_mask[1:]
        is_copy &= tgt >= 0
        ce = torch.zeros(ids.shape[0], device=ids.device)
        for a in range(0, ids.shape[0], 4096):  # chunked: logits of one chunk at a time
            logits = model.lm.lm_head(out.hidden[a : a + 4096].detach()).float()
            ce[a : a + 4096] = F.cross_entropy(logits, tgt[a : a + 4096], ignore_index=-100, reduction="none")
        copy_loss = float(ce[is_copy].mean()) if bool(is_copy.any()) else float("nan")
    kl = out.indexer_loss
    return out, {
        "lm_loss": round(float(out.lm_loss.detach()), 4),
        "copy_loss": round(copy_loss, 4),
        "indexer_kl": None if kl is None else round(float(kl.detach()), 4),
    }


def train_phase(model, data, steps, first, lr, warm, params, objective, device, out_dir, phase) -> None:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (s + 1) / max(1, warm))
        ids, mask, cu = data.batch(first + s, device)
        t0 = time.perf_counter()
        out, row = step_losses(model, ids, mask, cu)
        loss = out.indexer_loss if objective == "indexer" else out.loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        log(out_dir, phase=phase, step=s, batch=first + s, grad_norm=round(float(gn), 3),
            step_s=round(time.perf_counter() - t0, 3), **row)  # fmt: skip


def evaluate(model, data, n_batches, device, out_dir, phase) -> None:
    model.eval()
    attns = [m for m in model.modules() if hasattr(m, "force_indexer_loss")]
    for m in attns:
        m.force_indexer_loss = True
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(n_batches):
            ids, mask, cu = data.batch(i, device)
            _, row = step_losses(model, ids, mask, cu)
            for k, v in row.items():
                if v is not None:
                    sums.setdefault(k, []).append(v)
    for m in attns:
        m.force_indexer_loss = False
    model.train()
    log(out_dir, phase=phase, heldout_batches=n_batches,
        **{f"heldout_{k}": round(sum(v) / len(v), 4) for k, v in sums.items()})  # fmt: skip


def selection_shape(model, data, device, out_dir, phase, selection, window, sink) -> None:
    """Log per-layer selection stats of `selection` on held-out batch 0, leaving the model's modes as they were."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dsa_selection_stats import measure

    lm = model.config.lm
    modes, old_sel, was_training = list(lm.attention_modes), lm.dsa.selection, model.training
    lm.dsa.selection = selection
    ids, _, cu = data.batch(0, device)
    t0 = time.perf_counter()
    rows = measure(model, ids, cu, window=window, sink=sink)
    for m in model.modules():
        if hasattr(m, "force_indexer_loss"):
            m.force_indexer_loss = False
    lm.attention_modes, lm.dsa.selection = modes, old_sel
    model.train(was_training)
    for r in rows:
        log(out_dir, case="selection_stats", phase=phase, window=window, sink=sink, tokens=int(cu[-1]),
            s=round(time.perf_counter() - t0, 1), **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--n-seq", type=int, default=2, help="sequences per step (packed)")
    ap.add_argument("--span", type=int, default=64)
    ap.add_argument("--copy-min-dist", type=int, default=2560)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--sparse-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--indexer-lr", type=float, default=1e-3)
    ap.add_argument("--sparse-lr", type=float, default=3e-4)
    ap.add_argument("--heldout-batches", type=int, default=4)
    ap.add_argument("--branches", default="dsa-token,dsa-block,dense")
    ap.add_argument("--selection-block", type=int, default=64)
    ap.add_argument("--stats", action="store_true", help="selection shape after the warm-up and each branch")
    ap.add_argument("--stats-window", type=int, default=256)
    ap.add_argument("--stats-sink", type=int, default=16)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    if args.cpu_smoke:
        os.environ.setdefault("KEYE_KERNELS", "reference")
        args.preset, args.seq_len, args.copy_min_dist, args.span = "tiny", 384, 160, 32
        args.pretrain_steps = args.warmup_steps = args.sparse_steps = 2
        args.heldout_batches, args.vocab = 1, 512
    cfg = preset(args.preset, vocab_size=args.vocab)
    cfg.vision.num_layers = 1  # text-only: the ViT is not run
    cfg.lm.dsa.selection_block = args.selection_block
    log(args.out, case="setup", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__, args=vars(args), topk=cfg.lm.dsa.topk, layers=cfg.lm.num_layers,
        kernels={n: dispatch.backend_name(n, torch.zeros(1, device=device))
                 for n in ("indexer_topk", "block_topk", "sparse_attention", "indexer_kl")})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype)
    model.train()
    train = CopyData(args.vocab, args.seq_len, args.n_seq, args.span, args.copy_min_dist, seed=1)
    held = CopyData(args.vocab, args.seq_len, args.n_seq, args.span, args.copy_min_dist, seed=2)
    idx_params = set(map(id, model.indexer_parameters()))
    main_params = [p for p in model.parameters() if id(p) not in idx_params]
    t0 = time.perf_counter()
    # shared prefix: dense pretrain (indexer frozen), then the indexer warm-up (main model frozen)
    model.set_attention_mode("dense")
    for p in model.indexer_parameters():
        p.requires_grad_(False)
    train_phase(
        model, train, args.pretrain_steps, 0, args.lr, 20, main_params, "lm", device, args.out, "pretrain"
    )
    model.set_attention_mode("dsa_warmup")
    for p in model.parameters():
        p.requires_grad_(id(p) in idx_params)
    train_phase(model, train, args.warmup_steps, args.pretrain_steps, args.indexer_lr, 5,
                model.indexer_parameters(), "indexer", device, args.out, "dsa_warmup")  # fmt: skip
    evaluate(model, held, args.heldout_batches, device, args.out, "after_warmup")
    shape = (args.stats_window, args.stats_sink)
    if args.stats:
        for sel in ("token", "block"):
            selection_shape(model, held, device, args.out, "after_warmup", sel, *shape)
    for p in model.parameters():
        p.requires_grad_(True)
    shared = copy.deepcopy(model.state_dict())
    first = args.pretrain_steps + args.warmup_steps
    for branch in args.branches.split(","):
        model.load_state_dict(shared)
        mode = "dense" if branch == "dense" else "dsa"
        model.config.lm.dsa.selection = "block" if branch == "dsa-block" else "token"
        model.set_attention_mode(mode)
        params = [p for p in model.parameters() if p.requires_grad]
        if mode == "dense":  # dense attention gives the indexer no loss
            params = [p for p in params if id(p) not in idx_params]
        torch.manual_seed(1)
        train_phase(model, train, args.sparse_steps, first, args.sparse_lr, 10, params, "lm", device, args.out,
                    branch)  # fmt: skip
        evaluate(model, held, args.heldout_batches, device, args.out, f"heldout_{branch}")
        if args.stats and mode == "dsa":
            selection_shape(model, held, device, args.out, branch, model.config.lm.dsa.selection, *shape)
    log(args.out, case="done", wall_s=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
