"""Context-parallel attention on the kernels (keye/model/context_parallel.py) vs its reference path, on one GPU.

1. Checks (bf16 unless noted, random packed inputs, query rows starting mid-sample): the Triton indexer top-k, the
   indexer KL and sparse attention with a query-row offset against the same kernels on the whole pack and against
   the torch reference; the lower-right causal SDPA against the reference blocks (bf16 and fp32: fp32 on CUDA
   expands the KV heads); `context_parallel.attention` on the kernels against its reference path (dense, DSA).
2. Times one CP rank's attention forward at the 30B-A3B shape (Hq 32, Hkv 4, D 128; indexer 16 x 64 from the
   preset's DSAConfig; top-k 2048) on a 128K-token sample split as CP=4 splits it (rank 0: chunks 0 and 7 of 8):
   the kernel path, the reference path (KEYE_KERNELS=reference), and the ideal = the whole sample on one GPU / 4.
   The all-gather is not timed (k, v, k_idx are given whole; `gather_rows` is bypassed).
3. A 2-process gloo run on this one GPU of a CP=2 training step (tiny preset, DSA top-64, 4 packed samples):
   loss and gradients against one process, if gloo takes CUDA tensors for all_gather / all_reduce.

  python bench/cp_attention.py --out OUT_DIR [--t 131072] [--skip-ref] [--skip-gloo]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cuda_timing import median_ms  # noqa: E402  (bench/, the script's folder)

from keye.kernels import dsa_reference as ref  # noqa: E402
from keye.kernels.dense_sdpa import dense_attention_sdpa, suffix_causal_sdpa  # noqa: E402
from keye.kernels.indexer_kl import indexer_kl, indexer_kl_stats  # noqa: E402
from keye.kernels.indexer_topk import indexer_topk  # noqa: E402
from keye.kernels.sparse_attention import sparse_attention, sparse_attention_fwd  # noqa: E402
from keye.model import context_parallel as cp  # noqa: E402

HQ, HKV, D = 32, 4, 128  # Qwen3-30B-A3B attention
HI, DI, TOPK = 16, 64, 2048  # keye.model.config DSAConfig defaults (the 30b-a3b preset)
DEV = "cuda"
BF = torch.bfloat16
RESULTS: list[dict] = []


def log(**row: object) -> None:
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def timeit(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of `fn` (CUDA events)."""
    return median_ms(fn, reps, warmup)


def rnd(*shape: int, dtype=None, seed: int = 0) -> torch.Tensor:
    dtype = dtype or BF
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, generator=g).to(dtype)


def inputs(t: int, hq: int, hkv: int, d: int, hi: int, di: int, dtype=None) -> dict:
    dtype = dtype or BF
    return {
        "q": rnd(t, hq, d, dtype=dtype, seed=1),
        "k": rnd(t, hkv, d, dtype=dtype, seed=2),
        "v": rnd(t, hkv, d, dtype=dtype, seed=3),
        "qi": rnd(t, hi, di, dtype=dtype, seed=4),
        "ki": rnd(t, di, dtype=dtype, seed=5),
        "w": (rnd(t, hi, dtype=torch.float32, seed=6) * hi**-0.5).to(dtype),
    }


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def checks(t: int = 6000, topk: int = 256) -> None:
    cu = torch.tensor([0, t * 11 // 60, t * 41 // 60, t], dtype=torch.int32, device=DEV)
    x = inputs(t, HQ, HKV, D, HI, DI)
    full_idx, full_sc = indexer_topk(x["qi"], x["ki"], x["w"], cu, topk)
    ridx, _ = ref.indexer_topk_reference(x["qi"], x["ki"], x["w"], cu, topk)
    for r0, r1 in [
        (t * 7 // 60, t * 23 // 60),
        (t * 39 // 60, t),
        (0, t // 4),
    ]:  # mid-sample starts, crossing samples
        for method in ("fused", "slab"):
            idx, sc = indexer_topk(x["qi"][r0:r1], x["ki"], x["w"][r0:r1], cu, topk, method=method, q_row0=r0)
            same = float((idx == full_idx[r0:r1]).all(1).float().mean())
            a, b = idx.long(), ridx[r0:r1].long()
            inter = sum(len(set(a[i].tolist()) & set(b[i].tolist()) - {-1}) for i in range(0, r1 - r0, 97))
            tot = sum(len(set(b[i].tolist()) - {-1}) for i in range(0, r1 - r0, 97))
            log(kind="check", what="indexer_topk offset", rows=[r0, r1], method=method,
                rows_identical_to_whole_pack_kernel=same, recall_vs_reference_sampled=inter / max(1, tot))  # fmt: skip
        o, lse = sparse_attention(x["q"][r0:r1], x["k"], x["v"], full_idx[r0:r1], D**-0.5)
        fo, _ = sparse_attention_fwd(x["q"], x["k"], x["v"], full_idx, D**-0.5)
        ro, _ = ref.sparse_attention_reference(x["q"][r0:r1], x["k"], x["v"], full_idx[r0:r1], D**-0.5)
        log(kind="check", what="sparse_attention q rows < k rows", rows=[r0, r1],
            max_err_vs_whole_pack_kernel=err(o, fo[r0:r1]), max_err_vs_reference=err(o, ro))  # fmt: skip
        for sparse in (False, True):
            ind = full_idx[r0:r1] if sparse else None
            loss, *_ = indexer_kl_stats(x["q"][r0:r1], x["k"], cu, D**-0.5, x["qi"][r0:r1], x["ki"], x["w"][r0:r1],
                                        ind, q_row0=r0)  # fmt: skip
            floss, *_ = indexer_kl_stats(
                x["q"], x["k"], cu, D**-0.5, x["qi"], x["ki"], x["w"], full_idx if sparse else None
            )
            want = 0.0
            for a, b in ref.sample_bounds(cu):
                q0, q1 = max(a, r0), min(b, r1)
                for s in range(q0, q1, 256):
                    e = min(s + 256, q1)
                    want += float(ref._kl_block(x["q"], x["k"], x["qi"], x["ki"], x["w"],
                                                None if ind is None else full_idx[s:e], a, s, e, D**-0.5))  # fmt: skip
            log(kind="check", what="indexer_kl offset", rows=[r0, r1], sparse=sparse,
                max_err_per_token_vs_whole_pack_kernel=err(loss, floss[r0:r1]),
                sum=float(loss.sum()), reference_sum=want)  # fmt: skip
    for dtype in dict.fromkeys((BF, torch.float32)):
        m = t // 2
        y = inputs(m, HQ, HKV, D, HI, DI, dtype=dtype)
        for n in (m // 3, m, 1):
            o = suffix_causal_sdpa(y["q"][m - n :], y["k"], y["v"], D**-0.5)
            ro, _ = ref.dense_attention_reference(y["q"], y["k"], y["v"], cu.new_tensor([0, m]), D**-0.5)
            log(kind="check", what="suffix_causal_sdpa", dtype=str(dtype), n=n, keys=m,
                max_err_vs_reference=err(o, ro[m - n :]))  # fmt: skip
    # the whole CP attention of one rank (cp=4, rank 1) on the kernels vs its reference path
    cpc = cp.CPContext(None, cu, cp.balanced_rows(t, 4, 1).to(DEV), t)
    rows = cpc.rows
    for mode, want_kl in (("dense", False), ("dsa", True)):
        outs = {}
        for kern in ("auto", "reference"):
            os.environ["KEYE_KERNELS"] = kern
            outs[kern] = cp.attention(x["q"][rows], x["k"], x["v"], cpc, D**-0.5, mode, topk, 1024,
                                      x["qi"][rows], x["ki"], x["w"][rows], want_kl, False)  # fmt: skip
        os.environ["KEYE_KERNELS"] = "auto"
        (o1, kl1), (o2, kl2) = outs["auto"], outs["reference"]
        log(kind="check", what="context_parallel.attention kernels vs reference", mode=mode, cp=4, rank=1,
            max_err=err(o1, o2), kl=None if kl1 is None else [float(kl1), float(kl2)])  # fmt: skip


def timings(t: int, part: str) -> None:
    """part "kernels": the kernel path and the ideal; "reference": the reference path once (slow)."""
    cpn = 4
    cu = torch.tensor([0, t], dtype=torch.int32, device=DEV)
    x = inputs(t, HQ, HKV, D, HI, DI)
    cpc = cp.CPContext(None, cu, cp.balanced_rows(t, cpn, 0).to(DEV), t)
    rows = cpc.rows
    loc = {n: x[n][rows].contiguous() for n in ("q", "qi", "w")}
    scale = D**-0.5

    def rank_attention(mode: str, want_kl: bool = False):
        return lambda: cp.attention(loc["q"], x["k"], x["v"], cpc, scale, mode, TOPK, 1024, loc["qi"], x["ki"],
                                    loc["w"], want_kl, False)  # fmt: skip

    base = dict(
        kind="time", T=t, cp=cpn, rank=0, local_rows=int(rows.numel()), shape=[HQ, HKV, D, HI, DI, TOPK]
    )
    if part == "reference":
        os.environ["KEYE_KERNELS"] = "reference"
        try:
            with torch.no_grad():
                for mode in ("dense", "dsa"):
                    t0 = time.perf_counter()
                    rank_attention(mode)()
                    torch.cuda.synchronize()
                    ms = 1e3 * (time.perf_counter() - t0)
                    log(**base, what=f"{mode} fwd reference path (one run)", reference_ms=ms)
        finally:
            os.environ["KEYE_KERNELS"] = "auto"
        return
    with torch.no_grad():
        ideal_dense = timeit(lambda: dense_attention_sdpa(x["q"], x["k"], x["v"], cu, scale))
        kern_dense = timeit(rank_attention("dense"))
        log(**base, what="dense fwd", kernels_ms=kern_dense, whole_sample_sdpa_ms=ideal_dense,
            ideal_ms=ideal_dense / cpn, kernels_over_ideal=kern_dense / (ideal_dense / cpn))  # fmt: skip

        def whole_dsa():
            idx, _ = indexer_topk(x["qi"], x["ki"], x["w"], cu, TOPK)
            return sparse_attention_fwd(x["q"], x["k"], x["v"], idx, scale)

        ideal_dsa = timeit(whole_dsa, reps=3)
        kern_dsa = timeit(rank_attention("dsa"), reps=3)
        idx_l = torch.cat([indexer_topk(loc["qi"][lo : lo + c1 - c0], x["ki"], loc["w"][lo : lo + c1 - c0], cu, TOPK,
                                        q_row0=c0)[0] for lo, c0, c1 in cp._chunks(cpc)])  # fmt: skip
        topk_ms = timeit(lambda: [indexer_topk(loc["qi"][lo : lo + c1 - c0], x["ki"], loc["w"][lo : lo + c1 - c0],
                                               cu, TOPK, q_row0=c0) for lo, c0, c1 in cp._chunks(cpc)], reps=3)  # fmt: skip
        sparse_ms = timeit(lambda: sparse_attention_fwd(loc["q"], x["k"], x["v"], idx_l, scale), reps=3)
        log(**base, what="dsa fwd (top-k + sparse)", kernels_ms=kern_dsa, kernels_topk_ms=topk_ms,
            kernels_sparse_ms=sparse_ms, whole_sample_ms=ideal_dsa, ideal_ms=ideal_dsa / cpn,
            kernels_over_ideal=kern_dsa / (ideal_dsa / cpn))  # fmt: skip
    # the indexer KL of the rank (sparse stage), forward + backward, vs the whole sample's / cp
    qi_g, ki_g, w_g = (y.clone().requires_grad_() for y in (loc["qi"], x["ki"], loc["w"]))
    qa, ka, wa = (y.clone().requires_grad_() for y in (x["qi"], x["ki"], x["w"]))
    idx_full, _ = indexer_topk(x["qi"], x["ki"], x["w"], cu, TOPK)

    def kl_rank():
        tot = 0
        for lo, c0, c1 in cp._chunks(cpc):
            s = slice(lo, lo + c1 - c0)
            tot = tot + indexer_kl(loc["q"][s], x["k"], cu, scale, qi_g[s], ki_g, w_g[s], idx_l[s], q_row0=c0)
        tot.backward()

    kl_k = timeit(kl_rank, reps=3)
    kl_w = timeit(lambda: indexer_kl(x["q"], x["k"], cu, scale, qa, ka, wa, idx_full).backward(), reps=3)
    log(**base, what="indexer KL fwd+bwd (sparse)", kernels_ms=kl_k, whole_sample_ms=kl_w, ideal_ms=kl_w / cpn,
        kernels_over_ideal=kl_k / (kl_w / cpn))  # fmt: skip


def probe_sdpa(t: int) -> None:
    """Which SDPA kernel the lower-right causal segment takes, and its time against alternatives: rank 0's late chunk
    at CP=4 (t/8 queries over the last t/8 + 7t/8 keys)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    n, length = t // 8, t
    x = inputs(length, HQ, HKV, D, HI, DI)
    q = x["q"][length - n :].transpose(0, 1).unsqueeze(0)
    k, v = (x[c].transpose(0, 1).unsqueeze(0) for c in ("k", "v"))
    ke, ve = (y.repeat_interleave(HQ // HKV, dim=1) for y in (k, v))
    scale = D**-0.5
    mask = causal_lower_right(n, length)
    F = torch.nn.functional
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    variants = {
        "causal_lower_right gqa (current)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
        ),
        "causal_lower_right kv expanded": lambda: F.scaled_dot_product_attention(
            q, ke, ve, attn_mask=mask, scale=scale
        ),
        "aten flash op, is_causal (lower right), gqa": lambda: flash(
            q, k, v, 0.0, is_causal=True, scale=scale
        )[0],
        "aten flash op, is_causal, kv expanded": lambda: flash(q, ke, ve, 0.0, is_causal=True, scale=scale)[
            0
        ],
        "square causal n x n (reference point)": lambda: F.scaled_dot_product_attention(
            q, k[:, :, -n:], v[:, :, -n:], is_causal=True, scale=scale, enable_gqa=True
        ),
    }
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        ref_o = variants["causal_lower_right kv expanded"]()
        for name, fn in variants.items():
            try:
                ms = timeit(fn, reps=5)
                e = err(fn(), ref_o) if "square" not in name else None
                log(kind="probe_sdpa", variant=name, n=n, keys=length, ms=ms, max_err_vs_expanded=e)
            except Exception as ex:  # noqa: BLE001
                log(kind="probe_sdpa", variant=name, error=repr(ex)[-500:])
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
                log(kind="probe_sdpa", variant="current under sdpa_kernel(FLASH)", ok=True)
            except Exception as ex:  # noqa: BLE001
                log(kind="probe_sdpa", variant="current under sdpa_kernel(FLASH)", error=repr(ex)[-500:])
    log(kind="probe_sdpa", warnings=sorted({str(w.message)[:300] for w in caught}))


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from keye.model import build_model
    from keye.model.config import preset
    from keye.model.context_parallel import CPContext, set_context
    from keye.model.lm import chunked_cross_entropy, default_position_ids, shifted_targets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.cuda.set_device(0)
    res: dict = {"rank": rank}
    try:
        cfg = preset("tiny", vocab_size=512, image_token_id=511)
        cfg.lm.num_layers, cfg.lm.attention_modes, cfg.lm.router_aux_loss_coef = 2, [], 0.0
        cfg.set_attention_mode("dsa")
        cu = torch.tensor([0, 300, 1000, 1500, 2048], dtype=torch.int32, device=DEV)
        ids = torch.randint(0, 511, (2048,), generator=torch.Generator().manual_seed(7)).to(DEV)
        pos, targets = default_position_ids(cu), shifted_targets(ids, cu)

        def step(cpc):
            model = build_model(cfg, seed=0).to(DEV).train()
            set_context(model, cpc)
            rows = cpc.rows if cpc is not None else torch.arange(2048, device=DEV)
            o = model.lm(model.lm.embed_tokens(ids[rows]), pos[:, rows], cu)
            tot, _ = chunked_cross_entropy(o.hidden, model.lm.lm_head.weight, targets[rows])
            loss = tot / int((targets != -100).sum()) + o.indexer_loss
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            return torch.stack([loss.detach(), o.indexer_loss.detach()]), grads

        one, g1 = step(None)
        cpc = CPContext.balanced(cu)
        cpc.rows = cpc.rows.to(DEV)
        two, g2 = step(cpc)
        dist.all_reduce(two)
        for g in g2.values():
            dist.all_reduce(g)
        res.update(loss_one=float(one[0]), loss_cp=float(two[0]), kl_one=float(one[1]), kl_cp=float(two[1]),
                   max_rel_grad_err=max(err(g2[n], g1[n]) / max(float(g1[n].abs().max()), 1e-12) for n in g1),
                   grads=len(g1))  # fmt: skip
    except Exception:  # noqa: BLE001
        res["error"] = traceback.format_exc()[-3000:]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def gloo_step(outdir: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(outdir, "gloo_cp2.json")
    mp.spawn(_gloo_worker, args=(2, port, path), nprocs=2, join=True)
    with open(path) as f:
        log(kind="gloo_cp2_training_step", **json.load(f))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t", type=int, default=131072)
    ap.add_argument("--skip-ref", action="store_true")
    ap.add_argument("--skip-gloo", action="store_true")
    ap.add_argument("--probe-sdpa", action="store_true", help="only the lower-right SDPA kernel probe")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: the checks only"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cp.gather_rows = lambda x, cpc: (
        x
    )  # one process: k, v, k_idx are passed whole (the all-gather is not timed)
    if args.smoke:
        global DEV, BF, HQ, HKV, D, HI, DI
        DEV, BF, HQ, HKV, D, HI, DI = "cpu", torch.float32, 4, 2, 16, 2, 16
        checks(120, 8)
        return
    log(kind="env", device=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.probe_sdpa:
        probe_sdpa(args.t)
        with open(os.path.join(args.out, "cp_sdpa_probe.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
        return
    for name, fn in (("checks", checks), ("timings", lambda: timings(args.t, "kernels")),
                     ("gloo", None if args.skip_gloo else lambda: gloo_step(args.out)),
                     ("reference", None if args.skip_ref else lambda: timings(args.t, "reference"))):  # fmt: skip
        if fn is None:
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001
            log(kind="error", part=name, trace=traceback.format_exc()[-3000:])
        with open(os.path.join(args.out, "cp_attention.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
