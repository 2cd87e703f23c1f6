"""Batched autoregressive generation with a KV cache (and the DSA indexer-key cache), temperature / top-p sampling,
stop strings and per-token log-probabilities (what RL and on-policy distillation consume).

Prompts are prefilled together as one packed batch (no padding); decode then appends one token per sequence.
Prompts come already templated (frames, timestamps, chat markup) by the same tokenizer code as training.
Follows the usual HF/vLLM sampling semantics (top-p = nucleus sampling, Holtzman et al. 2020).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from keye.model.cache import KVCache
from keye.model.rope import mrope_positions
from keye.model.shared_prefix import dense_only, sharing_prefix
from keye.model.shared_prefix import share_prefix as shared_batch
from keye.model.vit import frame_grids
from keye.model.vlm import KeyeVL


@dataclass
class Prompt:
    """One prompt: token ids plus (optionally) its frames; position_ids default to the M-RoPE rule.

    The sampling fields, when set, override the `generate` arguments for this prompt only, so requests with
    different settings share one batch (the serving endpoint); a per-prompt `generator` makes its samples depend on
    its own seed only, not on what else is in the batch."""

    input_ids: Tensor | list[int]
    pixel_patches: Tensor | None = None
    patch_grids: Tensor | None = None
    position_ids: Tensor | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_strings: Sequence[str] | None = None
    generator: torch.Generator | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens (the eos / stop token included)
    logprobs: list[
        float
    ]  # log-prob of each token under the tempered, untruncated distribution (image token masked)
    finish_reason: str  # "eos" | "stop" | "length"
    text: str | None = None  # decoded text (cut before the stop string) when a decode function was given
    prompt_len: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def _as_prompt(p: Prompt | Tensor | list[int]) -> Prompt:
    return p if isinstance(p, Prompt) else Prompt(input_ids=p)


def _positions(model: KeyeVL, p: Prompt, ids: Tensor) -> Tensor:
    if p.position_ids is not None:
        return p.position_ids.to(torch.int64).cpu()
    if p.patch_grids is None:
        return torch.arange(ids.shape[0])[None].expand(3, -1).clone()
    merge = model.config.vision.spatial_merge
    merged = [(h // merge, w // merge) for h, w in frame_grids(p.patch_grids)]
    return mrope_positions(ids, model.config.image_token_id, merged)


def sample_next(
    logits: Tensor,
    temperature: float | Tensor,
    top_p: float | Tensor,
    generator: torch.Generator | None | Sequence[torch.Generator | None],
) -> tuple[Tensor, Tensor]:
    """(token [B], logprob [B]): greedy at temperature 0; logprob from log_softmax(logits / temperature).
    temperature / top_p may be per row ([B] tensors), generator one per row (a list)."""
    logits = logits.float()
    b = logits.shape[0]
    temp = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(b)
    topp = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(b)
    greedy = temp <= 0
    if bool(greedy.all()):
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / torch.where(greedy, 1.0, temp)[:, None], dim=-1)
    probs = logp.exp()
    if bool((topp < 1.0).any()):
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < topp[:, None]  # the first token is always kept
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
    if isinstance(generator, list | tuple):
        rows = []
        for i, g in enumerate(generator):
            dev = g.device if g is not None else probs.device
            rows.append(torch.multinomial(probs[i : i + 1].to(dev), 1, generator=g)[:, 0].to(probs.device))
        tok = torch.cat(rows)
    else:
        gen_device = generator.device if generator is not None else probs.device
        tok = torch.multinomial(probs.to(gen_device), 1, generator=generator)[:, 0].to(probs.device)
    if bool(greedy.any()):
        tok = torch.where(greedy, logits.argmax(dim=-1), tok)
        logp = torch.where(greedy[:, None], torch.log_softmax(logits, dim=-1), logp)
    return tok, logp.gather(1, tok[:, None])[:, 0]


@torch.no_grad()
def generate(
    model: KeyeVL,
    prompts: Sequence[Prompt | Tensor | list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    generator: torch.Generator | None = None,
    top_logprobs: int = 0,
    share_prefix: bool = False,
) -> list[GenerationResult]:
    """Generate up to `max_new_tokens` for every prompt; stop strings need `decode` (token ids -> text).
    A Prompt's own sampling fields override these arguments for it. `top_logprobs` > 0 also records, per generated
    token, the k most likely (token id, logprob) pairs in `extra["top_logprobs"]` (same distribution as logprobs).
    `share_prefix`: prompts that open with the same tokens (an agent's system prompt and tool block) prefill that
    prefix once (keye.model.shared_prefix; dense models; the same values up to float rounding, so off by default:
    the eval's numbers stay bit for bit)."""
    items = [_as_prompt(p) for p in prompts]
    stops = [list(p.stop_strings if p.stop_strings is not None else stop_strings) for p in items]
    if any(stops) and decode is None:
        raise ValueError("stop_strings need a decode function")
    limits = [p.max_new_tokens if p.max_new_tokens is not None else max_new_tokens for p in items]
    temps = [p.temperature if p.temperature is not None else temperature for p in items]
    top_ps = [p.top_p if p.top_p is not None else top_p for p in items]
    per_row_gen = any(p.generator is not None for p in items)
    gens = (
        [p.generator if p.generator is not None else generator for p in items] if per_row_gen else generator
    )
    was_training = model.training
    model.eval()
    device = model.device
    # rows that ask the very same prompt objects (a rollout group: G samples of one prompt) share one prefill,
    # whose cache rows and last logits are then copied to each of them
    first: dict[tuple[int, int, int], int] = {}
    uniq: list[Prompt] = []
    src: list[int] = []  # row -> its prompt in uniq
    for p in items:
        key = (id(p.input_ids), id(p.pixel_patches), id(p.patch_grids))
        if key not in first:
            first[key] = len(uniq)
            uniq.append(p)
        src.append(first[key])
    ids_u = [torch.as_tensor(p.input_ids, dtype=torch.int64).cpu() for p in uniq]
    pos_u = [_positions(model, p, ids) for p, ids in zip(uniq, ids_u, strict=True)]
    lens_u = torch.tensor([len(x) for x in ids_u])
    if int(lens_u.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    b = len(items)
    rows = torch.tensor(src, dtype=torch.int64)
    lens, pos_list = lens_u[rows], [pos_u[j] for j in src]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens_u, 0)]).to(torch.int32)
    patches = [p.pixel_patches for p in uniq if p.pixel_patches is not None]
    grids = [p.patch_grids for p in uniq if p.patch_grids is not None]
    max_new = max(limits)
    if max_new < 1:
        raise ValueError("max_new_tokens must be >= 1")
    cache = KVCache.allocate(model.config.lm, len(uniq), int(lens.max()) + max_new, model.dtype, device)
    pixels = {
        "pixel_patches": torch.cat(patches).to(device) if patches else None,
        "patch_grids": torch.cat(grids).to(device) if grids else None,
    }
    shared = None
    if share_prefix and dense_only(model):
        unlabelled = [torch.full_like(x, -100) for x in ids_u]
        shared = shared_batch(ids_u, pos_u, unlabelled, model.config.image_token_id)
    if shared is not None:
        ids, pos, cu = shared.input_ids, shared.position_ids, shared.layout.cu_seqlens
        last, packing = cu[2:] - 1, sharing_prefix(model, shared.layout)
    else:
        ids, pos, last, packing = (
            torch.cat(ids_u),
            torch.cat(pos_u, dim=1),
            cu[1:] - 1,
            contextlib.nullcontext(),
        )
    with packing:
        out = model(
            input_ids=ids.to(device),
            position_ids=pos.to(device),
            cu_seqlens=cu.to(device),
            cache=cache,
            logits_index=last.to(device, torch.int64),
            **pixels,
        )
    cache.set_lengths(lens_u.to(device))
    logits = out.logits
    if len(uniq) < b:
        cache = cache.take_rows(rows)
        logits = logits.index_select(0, rows.to(logits.device))
    cache.decoding = True
    next_pos = torch.stack([p.max() + 1 for p in pos_list]).to(device)
    results = [GenerationResult([], [], "length", prompt_len=int(n)) for n in lens]
    done = [False] * b
    eos = set(int(e) for e in eos_token_ids)
    step_cu = torch.arange(b + 1, dtype=torch.int32, device=device)
    temp_t = torch.tensor(temps, dtype=torch.float32, device=device)
    topp_t = torch.tensor(top_ps, dtype=torch.float32, device=device)
    for step in range(max_new):
        logits = logits.float()
        logits[:, model.config.image_token_id] = float(
            "-inf"
        )  # placeholders are inputs only, never generated
        tok, lp = sample_next(logits, temp_t, topp_t, gens)
        if top_logprobs > 0:
            dist = torch.log_softmax(logits / torch.where(temp_t > 0, temp_t, 1.0)[:, None], dim=-1)
            top_v, top_i = dist.topk(min(top_logprobs, dist.shape[-1]), dim=-1)
            top_rows = [
                list(zip(ii, vv, strict=True)) for ii, vv in zip(top_i.tolist(), top_v.tolist(), strict=True)
            ]
        for i, (t, logprob) in enumerate(zip(tok.tolist(), lp.tolist(), strict=True)):
            if done[i]:
                continue
            r = results[i]
            r.token_ids.append(t)
            r.logprobs.append(logprob)
            if top_logprobs > 0:
                r.extra.setdefault("top_logprobs", []).append(top_rows[i])
            if t in eos:
                r.finish_reason, done[i] = "eos", True
            elif stops[i]:
                text = decode(r.token_ids)
                hit = min((text.find(s) for s in stops[i] if s in text), default=-1)
                if hit >= 0:
                    r.finish_reason, done[i], r.text = "stop", True, text[:hit]
            if not done[i] and len(r.token_ids) >= limits[i]:
                done[i] = True  # finish_reason stays "length"
        if all(done) or step == max_new - 1:
            break
        out = model(
            input_ids=tok.to(device),
            position_ids=next_pos[None].expand(3, -1),
            cu_seqlens=step_cu,
            cache=cache,
            logits_index=torch.arange(b, device=device),
        )
        logits = out.logits
        cache.advance(1)
        next_pos = next_pos + 1
    if decode is not None:
        for r in results:
            if r.text is None:
                r.text = decode(r.token_ids)
    model.train(was_training)
    return results
