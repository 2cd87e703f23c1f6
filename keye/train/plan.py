"""Memory per GPU of a training job and the mesh to run it on (`keye plan`): what a person needs before asking for
64 GPUs. Every term comes from the model's real shapes (parameters counted on the meta device, activations from
the tensors each block keeps for its backward), so a change to the model changes the plan.

Terms, per rank, for a world of N = dp_shard x ep x cp ranks and one packed sequence of S tokens per data rank:
- states: parameters, gradients, AdamW's two moments. FSDP2 shards dense weights over all N ranks and the experts
  over ep (whole experts) x dp_shard x cp (FSDP), so both come to 1/N of the model. `mixed` = the trainer on GPU
  (fp32 weights, grads and moments, bf16 compute: 16 B/param); `bf16` = bench/train.py (8 B/param).
- gathered (N > 1 only): FSDP2 unshards one decoder layer at a time in the compute dtype and prefetches the next (2 layers), plus
  one layer of unsharded gradients before its reduce-scatter, plus the root unit (embeddings, lm_head). Under EP a
  rank gathers only its E/ep experts.
- activations: T = S / cp tokens per rank. Without activation checkpointing every layer keeps its tensors; with it,
  each layer keeps its input and one layer at a time is recomputed. EP adds the all-to-all send/receive buffers
  (top_k copies of each token's hidden state, both ways); CP all-gathers one layer's K/V (and the indexer keys) over
  the cp ranks; DSA keeps the indexer's q/k/w and, per query token, top-k int32 indices for the layer in flight.
- loss: the chunked cross-entropy's chunk x vocab logits (bf16 product, fp32 copy, fp32 gradient). With activation
  checkpointing its backward runs before any layer is recomputed, so the peak is the larger of the two.
- serving caches (not part of training): K/V of every layer (bf16) and the indexer keys of one sequence of S tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024**3
H200_USABLE_GIB = 139.8  # torch.cuda.mem_get_info total on an H200 (143,771 MB), what the allocator can reach
LOSS_CHUNK = 4096  # keye.model.lm.chunked_cross_entropy's default
STATE_BYTES = {"mixed": (4, 4, 8, 2), "bf16": (2, 2, 4, 2)}  # param, grad, two moments, compute dtype


@dataclass(frozen=True)
class ParamCounts:
    total: int
    experts: int  # w_gate / w_up / w_down of every MoE layer
    per_layer_dense: int  # one decoder layer without its experts
    per_layer_experts: int
    root: int  # embeddings + lm_head + final norm (the root FSDP unit)
    vision: int  # ViT + projector


def count_params(cfg) -> ParamCounts:  # cfg: keye.model.ModelConfig
    """Counted on the meta device (no memory): every parameter of the real module tree."""
    from keye.model import build_model

    model = build_model(cfg, device="meta")
    seen: set[int] = set()
    total = experts = root = vision = 0
    layer0_dense = layer0_exp = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        is_expert = name.endswith(("w_gate", "w_up", "w_down"))
        experts += n if is_expert else 0
        if name.startswith("lm.layers.0."):
            layer0_exp += n if is_expert else 0
            layer0_dense += 0 if is_expert else n
        elif name.startswith(("vision.", "projector.")):
            vision += n
        elif not name.startswith("lm.layers."):
            root += n
    return ParamCounts(total, experts, layer0_dense, layer0_exp, root, vision)


def layer_activation_elems(lm, dsa: bool) -> int:
    """Elements kept for the backward by one decoder layer, per token (keye.model.lm.DecoderLayer)."""
    h, q, kv = lm.hidden_size, lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
    attn = (
        2 * h  # input, input_layernorm out
        + 2 * q + 2 * kv  # q/k projections and their QK-norm outputs
        + q + kv  # q/k after RoPE
        + kv  # v
        + q + 2 * lm.num_heads  # attention output, fp32 log-sum-exp
        + h  # o_proj out (the residual add)
    )  # fmt: skip
    k, f = lm.top_k, lm.moe_intermediate_size
    moe = (
        2 * h  # residual, post_attention_layernorm out
        + 4 * lm.num_experts  # fp32 router logits + probabilities
        + k
        * (
            3 * h + 4 * f
        )  # per routed copy: gathered input, gate, up, silu(gate), product, down out, weighted
    )
    idx = 0
    if dsa:
        d = lm.dsa
        idx = d.index_heads * d.index_dim + d.index_dim + d.index_heads + 2 * d.topk  # q, k, w; int32 top-k
    return attn + moe + idx


@dataclass
class MemoryPlan:
    preset: str
    gpus: int
    seq: int
    mesh: tuple[int, int, int]  # dp_shard, ep, cp
    attention: str
    act_ckpt: bool
    precision: str
    params: ParamCounts
    parts_gib: dict[str, float] = field(default_factory=dict)  # term -> GiB per rank (training)
    serve_cache_gib: float = 0.0

    @property
    def total_gib(self) -> float:
        return sum(self.parts_gib.values())

    def fits(self, budget_gib: float) -> bool:
        return self.total_gib <= budget_gib


def memory_plan(
    preset_name: str,
    gpus: int,
    seq: int,
    mesh: tuple[int, int, int],
    *,
    attention: str = "dsa",
    act_ckpt: bool = True,
    precision: str = "mixed",
    layers: int | None = None,
    vision_layers: int | None = None,
    vocab_size: int | None = None,
) -> MemoryPlan:
    """Memory per rank of one training step (see the module docstring for every term)."""
    from keye.model.config import preset

    cfg = preset(preset_name, vocab_size=vocab_size)
    if layers is not None:
        cfg.lm.num_layers = layers
    if vision_layers is not None:
        cfg.vision.num_layers = vision_layers
    lm = cfg.lm
    dp, ep, cp = mesh
    n = dp * ep * cp
    if n != gpus:
        raise ValueError(f"mesh {mesh} has {n} ranks, not {gpus}")
    if lm.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide {lm.num_experts} experts")
    if attention not in ("dense", "dsa"):
        raise ValueError(f"attention must be dense or dsa, got {attention!r}")
    pc = count_params(cfg)
    p_b, g_b, o_b, c_b = STATE_BYTES[precision]
    t = seq / cp  # tokens per rank
    h, v = lm.hidden_size, lm.vocab_size
    dsa = attention == "dsa"
    per_layer = layer_activation_elems(lm, dsa) * c_b  # bytes per token
    gathered_layer = (pc.per_layer_dense + pc.per_layer_experts / ep) * c_b
    parts = {
        "params": pc.total * p_b / n,
        "grads": pc.total * g_b / n,
        "optimizer": pc.total * o_b / n,
    }
    if n > 1:
        parts["fsdp_gathered"] = 3 * gathered_layer + pc.root * c_b
    loss = min(LOSS_CHUNK, t) * v * (c_b + 4 + 4) + t * h * 4
    if (
        act_ckpt
    ):  # the loss chunk's backward runs before the layers are recomputed: the larger of the two peaks
        parts["activations"] = lm.num_layers * t * h * c_b
        parts["recompute_or_loss"] = max(t * per_layer, loss)
    else:  # the loss runs while every layer's activations are alive
        parts["activations"] = lm.num_layers * t * per_layer
        parts["loss_chunk"] = loss
    if ep > 1:
        parts["ep_buffers"] = 2 * t * lm.top_k * h * c_b
    if cp > 1:
        kv = 2 * lm.num_kv_heads * lm.head_dim + (lm.dsa.index_dim if dsa else 0)
        parts["cp_gathered_kv"] = seq * kv * c_b
    plan = MemoryPlan(preset_name, gpus, seq, mesh, attention, act_ckpt, precision, pc)
    plan.parts_gib = {k: round(x / GIB, 3) for k, x in parts.items()}
    kv_tok = 2 * lm.num_kv_heads * lm.head_dim * 2 + (lm.dsa.index_dim * 2 if dsa else 0)
    plan.serve_cache_gib = round(lm.num_layers * seq * kv_tok / GIB, 3)
    return plan


def _pow2_divisors(x: int) -> list[int]:
    out, d = [], 1
    while d <= x:
        if x % d == 0:
            out.append(d)
        d *= 2
    return out


def suggest_mesh(
    preset_name: str,
    gpus: int,
    seq: int,
    budget_gib: float = 0.85 * H200_USABLE_GIB,
    gpus_per_node: int = 8,
    **kw,
) -> tuple[MemoryPlan, list[MemoryPlan]]:
    """The smallest cp that fits the budget (CP costs attention communication), with ep as large as one node allows
    (the all-to-all stays on NVLink) and dp_shard the rest. Returns (chosen, every candidate looked at)."""
    from keye.model.config import preset

    experts = preset(preset_name).lm.num_experts
    tried = []
    for cp in _pow2_divisors(gpus):
        rest = gpus // cp
        ep = max(d for d in _pow2_divisors(rest) if d <= gpus_per_node and experts % d == 0)
        plan = memory_plan(preset_name, gpus, seq, (rest // ep, ep, cp), **kw)
        tried.append(plan)
        if plan.fits(budget_gib):
            return plan, tried
    return min(tried, key=lambda p: p.total_gib), tried


def render(plan: MemoryPlan, tried: list[MemoryPlan], budget_gib: float) -> str:
    dp, ep, cp = plan.mesh
    pc = plan.params
    lines = [
        f"{plan.preset}: {pc.total / 1e9:.2f}B parameters ({pc.experts / 1e9:.2f}B in experts, "
        f"{pc.vision / 1e9:.2f}B ViT + projector); {plan.seq:,} tokens per sequence, {plan.attention} attention, "
        f"activation checkpointing {'on' if plan.act_ckpt else 'off'}, {plan.precision} precision",
        f"mesh: dp_shard={dp} x ep={ep} x cp={cp} = {plan.gpus} GPUs "
        f"(pipelines.yaml: train.parallel: {{dp_shard: {dp}, ep: {ep}, cp: {cp}}})",
        "memory per GPU (GiB):",
    ]
    lines += [f"  {k:<16} {v:8.2f}" for k, v in plan.parts_gib.items()]
    verdict = "fits" if plan.fits(budget_gib) else "DOES NOT FIT"
    lines.append(f"  {'total':<16} {plan.total_gib:8.2f}   ({verdict} in {budget_gib:.1f} GiB)")
    lines.append(
        f"serving caches for one {plan.seq:,}-token sequence (K/V + indexer keys): {plan.serve_cache_gib:.2f} GiB"
    )
    if len(tried) > 1:
        lines.append(
            "candidates: " + "; ".join(f"cp={p.mesh[2]} ep={p.mesh[1]}: {p.total_gib:.1f} GiB" for p in tried)
        )
    return "\n".join(lines)
