"""One rank of the multi-process tests (run by tests/unit/train/test_sharded_checkpoint.py and test_expert_parallel.py
with RANK/WORLD_SIZE/MASTER_* set; gloo, CPU, float32, one thread).

    python dist_worker.py SPEC.json   -> writes {"losses": [...], ...} to SPEC["out"] (rank 0)

The training loop is the trainer's loss rule in miniature: the step loss is the mean over all target tokens of the
global batch; rank r takes samples r, r+W, ...; every sample gets its own forward, so its loss is computed the same
way on any world size, and the logged step loss is the float64 sum of the per-sample sums in global sample order
(the same bits on 1, 2 or 4 ranks for the same weights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from keye.model import build_model
from keye.model.config import preset

N_SAMPLES, SEQ, VOCAB = 4, 24, 512


def tiny_config(layers: int = 2, experts: int = 4):
    cfg = preset("tiny", vocab_size=VOCAB, image_token_id=VOCAB - 1)
    cfg.lm.num_layers = layers
    cfg.lm.num_experts = experts
    cfg.lm.attention_modes = []
    return cfg


def shaped_30b_config(layers: int = 4):
    """30B-A3B's structure at CPU widths: 32 query / 4 KV heads (GQA 8), 128 experts top-8, the indexer's 16
    heads; hidden 128, head_dim 16, expert width 16, vocab 512 (the real widths need GBs per layer)."""
    cfg = preset("30b-a3b", vocab_size=VOCAB, image_token_id=VOCAB - 1)
    lm = cfg.lm
    lm.num_layers, lm.hidden_size, lm.head_dim, lm.mrope_section = layers, 128, 16, [2, 3, 3]
    lm.moe_intermediate_size, lm.dsa.index_dim = 16, 16
    v = cfg.vision
    v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.pos_grid = 64, 1, 2, 128, 16
    cfg.validate()
    return cfg


def model_config(spec: dict):
    if spec.get("shape") == "30b":
        return shaped_30b_config(spec.get("layers", 4))
    return tiny_config(spec.get("layers", 2), spec.get("experts", 4))


def batch(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, VOCAB - 1, (SEQ - i,), generator=g) for i in range(N_SAMPLES)]


def sample_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    out = model(input_ids=ids, labels=ids)
    n = int(out.num_tokens)
    return out.lm_loss * n + model.config.lm.router_aux_loss_coef * out.aux_loss, n


def train_steps(model, opt, steps: range, rank: int, world: int) -> list[float]:
    losses = []
    for s in steps:
        samples = batch(s)
        total_targets = sum(len(x) - 1 for x in samples)
        mine = list(range(rank, N_SAMPLES, world))
        sums = torch.zeros(N_SAMPLES, dtype=torch.float64)
        for i in mine:
            loss, n = sample_loss(model, samples[i])
            (loss * world / total_targets).backward()  # FSDP averages gradients over ranks: undo it
            sums[i] = loss.detach().double()
        if world > 1:
            dist.all_reduce(sums)  # exactly one rank holds each entry; the others add 0.0
        losses.append(float(sums.sum()) / total_targets)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def eval_loss(model) -> float:
    """Float64 mean target loss over batch(99), sample by sample (the same bits wherever the weights are equal)."""
    samples = batch(99)
    return sum(float(sample_loss(model, x)[0].double()) for x in samples) / sum(len(x) - 1 for x in samples)


def expert_parallel_grads(spec: dict, rank: int, world: int) -> dict:
    """One forward/backward of the packed batch split over `world` EP ranks (experts sharded when world > 1):
    the summed loss, the expert counts and every gradient (dense: summed over ranks; experts: concatenated).
    Optional: "load" a DCP checkpoint first; "update" (an SGD step of that lr, then "post_loss"); "save" after."""
    from safetensors.torch import save_file

    from keye.model.expert_parallel import shard_experts
    from keye.train.sharded_checkpoint import load_sharded, save_sharded

    model = build_model(model_config(spec), seed=0).train()
    if world > 1:
        shard_experts(model)
    if spec.get("load"):
        load_sharded(spec["load"], model)
    samples = batch(0)
    mine = samples[rank::world]
    ids = torch.cat(mine)
    cu = torch.tensor([0, *torch.tensor([len(x) for x in mine]).cumsum(0).tolist()], dtype=torch.int32)
    n_all = sum(len(x) - 1 for x in samples)
    coef = model.config.lm.router_aux_loss_coef

    def step_loss():  # noqa: ANN202
        out = model(input_ids=ids, cu_seqlens=cu, labels=ids)
        return (
            out,
            out.lm_loss * out.num_tokens / n_all + coef * out.aux_loss / world,
        )  # the ranks' losses add up

    def summed(x: torch.Tensor) -> float:
        x = x.detach().double().reshape(1)
        if world > 1:
            dist.all_reduce(x)
        return float(x[0])

    out, loss = step_loss()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        g = g.contiguous().clone()  # the reductions below must not touch p.grad
        if name.endswith(("w_gate", "w_up", "w_down")) and world > 1:
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g)
            g = torch.cat(parts)
        elif world > 1:
            dist.all_reduce(g)
        grads[name] = g
    result = {
        "loss": summed(loss),
        "expert_counts": out.expert_counts.tolist(),
        "aux": float(out.aux_loss.detach()),
    }
    if rank == 0 and spec.get("grads"):
        save_file(grads, spec["grads"])
    if spec.get("update"):
        with torch.no_grad():
            for p in model.parameters():
                if (
                    p.grad is not None
                ):  # DDP's rule for the dense weights: every rank applies the summed gradient
                    g = p.grad
                    if not hasattr(g, "to_local") and world > 1:
                        dist.all_reduce(g)
                    p -= spec["update"] * g
        result["post_loss"] = summed(step_loss()[1])
    if spec.get("save"):
        save_sharded(spec["save"], model, None).wait()
    return result


def context_parallel_grads(spec: dict, rank: int, world: int) -> dict:
    """One forward/backward of a 96-row pack of 4 samples split over `world` CP ranks (load-balanced chunks that
    cut through samples): the summed loss and every gradient summed over the ranks."""
    from safetensors.torch import save_file

    from keye.model.context_parallel import CPContext, set_context
    from keye.model.lm import chunked_cross_entropy, default_position_ids, shifted_targets

    cfg = tiny_config(spec.get("layers", 2), spec.get("experts", 4))
    cfg.lm.router_aux_loss_coef = (
        0.0  # the balance loss over a CP group is expert_parallel's, not tested here
    )
    cfg.lm.dsa.topk = spec.get("topk", 8)
    cfg.set_attention_mode(spec["attention"])
    model = build_model(cfg, seed=0).train()
    cu = torch.tensor([0, 30, 47, 72, 96], dtype=torch.int32)
    ids = torch.randint(0, VOCAB - 1, (96,), generator=torch.Generator().manual_seed(7))
    pos, targets = default_position_ids(cu), shifted_targets(ids, cu)
    rows = torch.arange(96)
    if world > 1:
        cpc = CPContext.balanced(cu)
        set_context(model, cpc)
        rows = cpc.rows
    out = model.lm(model.lm.embed_tokens(ids[rows]), pos[:, rows], cu)
    total, _ = chunked_cross_entropy(out.hidden, model.lm.lm_head.weight, targets[rows])
    loss = total / int((targets != -100).sum())
    if out.indexer_loss is not None:
        loss = loss + out.indexer_loss
    loss.backward()
    sums = torch.stack(
        [loss.detach(), out.indexer_loss.detach() if out.indexer_loss is not None else loss * 0]
    )
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        dist.all_reduce(sums)
        for g in grads.values():
            dist.all_reduce(g)
    if rank == 0:
        save_file(grads, spec["grads"])
    return {"loss": float(sums[0]), "indexer_loss": float(sums[1]), "rows": rows.tolist()}


# frames (patch grid h x w) of the 4 samples: sample 0 is a "long video", the others short
FRAMES = [[(4, 4), (6, 4), (8, 8), (4, 6), (2, 2)], [(4, 4)], [(6, 6)], []]


def vit_apart_grads(spec: dict, rank: int, world: int) -> dict:
    """Samples r, r+W, ... on rank r; the ViT encodes frames dealt over all ranks (keye.model.vision_parallel)
    when world > 1. Returns the summed loss, each rank's frame and patch counts encoded; grads summed over ranks."""
    from safetensors.torch import save_file

    from keye.model.lm import chunked_cross_entropy, default_position_ids, shifted_targets
    from keye.model.vision_parallel import deal_frames, embed_apart

    cfg = tiny_config(spec.get("layers", 2), spec.get("experts", 4))
    cfg.lm.router_aux_loss_coef = 0.0  # a per-rank statistic under data parallelism (the trainer's rule)
    model = build_model(cfg, seed=0).train()
    g = torch.Generator().manual_seed(3)
    dim = cfg.vision.in_channels * cfg.vision.patch_size**2
    samples = []
    for i, frames in enumerate(FRAMES):
        n_vis = sum((h // 2) * (w // 2) for h, w in frames)
        text = torch.randint(0, VOCAB - 1, (10 + i,), generator=g)
        ids = torch.cat([text[:4], torch.full((n_vis,), cfg.image_token_id), text[4:]])
        pix = torch.randn(sum(h * w for h, w in frames), dim, generator=g)
        samples.append((ids, pix, frames))
    n_all = sum(int((shifted_targets(s[0], torch.tensor([0, len(s[0])])) != -100).sum()) for s in samples)
    mine = samples[rank::world]
    ids = torch.cat([s[0] for s in mine])
    pix = torch.cat([s[1] for s in mine])
    grids = torch.tensor([[1, h, w] for s in mine for h, w in s[2]], dtype=torch.int64).reshape(-1, 3)
    cu = torch.tensor([0, *torch.tensor([len(s[0]) for s in mine]).cumsum(0).tolist()], dtype=torch.int32)
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    if world > 1:
        x = embed_apart(model, ids, pix, grids)
    else:
        x = model.embed(ids, pix, grids)
    out = model.lm(x, default_position_ids(cu), cu)
    total, _ = chunked_cross_entropy(out.hidden, model.lm.lm_head.weight, shifted_targets(labels, cu))
    loss = total / n_all
    loss.backward()
    sums = loss.detach().reshape(1)
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        dist.all_reduce(sums)
        for t in grads.values():
            dist.all_reduce(t)
    if rank == 0:
        save_file(grads, spec["grads"])
    every = [hw for s in samples[0::world] for hw in s[2]] + [hw for s in samples[1::world] for hw in s[2]]
    owners = deal_frames([h * w for h, w in every], world) if world > 1 else [0] * len(every)
    encoded = [sum(h * w for (h, w), o in zip(every, owners, strict=True) if o == r) for r in range(world)]
    return {"loss": float(sums[0]), "patches_encoded": encoded, "frames_held": [len(grids)]}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if spec.get("mode") in ("ep", "cp", "vit"):
        fn = {"ep": expert_parallel_grads, "cp": context_parallel_grads, "vit": vit_apart_grads}[spec["mode"]]
        result = fn(spec, rank, world)
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps(result))
        leave()
    from torch.distributed.device_mesh import init_device_mesh

    from keye.train.fsdp import shard_model
    from keye.train.sharded_checkpoint import export_full, load_sharded, save_sharded

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    model = build_model(tiny_config(spec.get("layers", 2)), seed=0).train()
    shard_model(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    result: dict = {"world": world}
    start = 0
    if spec.get("resume"):
        extra = load_sharded(spec["resume"], model, None if spec.get("drop_optimizer") else opt)
        start = int(extra["step"])
    losses = train_steps(model, opt, range(start, spec.get("save_at", spec["steps"])), rank, world)
    if "save_at" in spec:
        group = dist.new_group(
            backend="gloo"
        )  # the background writer's own group (training keeps the default)
        pending = save_sharded(
            spec["ckpt"], model, opt, {"step": spec["save_at"]}, async_save=True, process_group=group
        )
        losses += train_steps(model, opt, range(spec["save_at"], spec["steps"]), rank, world)
        pending.wait()
        result["files"] = sorted(p.name for p in Path(spec["ckpt"]).iterdir())
    if spec.get("export"):
        export_full(model, model.config, spec["export"])
        result["eval_loss"] = eval_loss(model.eval())
    result["losses"] = losses
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(result))
    leave()


def leave() -> None:
    """Tear gloo down and exit without interpreter finalisation. Every rank is done before any tears down (the
    barrier); and exiting through os._exit skips the finaliser that destroys tensors gloo's worker threads may
    still hold, which aborted a rank with "terminate called without an active exception" in CI twice (barrier alone
    did not stop it; pytorch/pytorch#179291 describes the race)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
