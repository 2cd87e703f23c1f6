"""Qwen3-MoE decoder (transformers' Qwen3MoeModel / Qwen3MoeForCausalLM) over packed sequences with M-RoPE.

Pre-norm blocks: RMSNorm -> attention (GQA, QK-norm, dense | dsa_warmup | dsa) -> RMSNorm -> MoE. Tokens are
packed into T rows with int32 cu_seqlens; no attention crosses a sample boundary. The causal-LM loss is computed in
row chunks with recomputation, so the (T x vocab) logits are never materialised during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from keye.model.attention import Attention
from keye.model.cache import KVCache
from keye.model.config import LMConfig
from keye.model.moe import MoE
from keye.model.norm import RMSNorm
from keye.model.rope import mrope_cos_sin, scale_section


@dataclass
class LMOutput:
    hidden: Tensor  # [T, H] after the final norm
    aux_loss: Tensor  # mean over layers of the load-balancing loss (unweighted)
    indexer_loss: Tensor | None  # sum over layers of the indexer KL (None when no layer computed one)
    expert_counts: Tensor  # int64 [num_layers, E]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        rope_idx: tuple[Tensor, Tensor],
        cu_seqlens: Tensor,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        a, kl = self.self_attn(self.input_layernorm(x), rope, rope_idx, cu_seqlens, cache)
        x = x + a
        m, aux = self.mlp(self.post_attention_layernorm(x))
        return x + m, aux.load_balance_loss, aux.expert_counts, kl


def default_cu_seqlens(t: int, device: torch.device) -> Tensor:
    return torch.tensor([0, t], dtype=torch.int32, device=device)


def default_position_ids(cu_seqlens: Tensor) -> Tensor:
    """[3, T] positions restarting at 0 in every sample (text only: all three axes equal)."""
    cu = cu_seqlens.to(torch.int64)
    lens = torch.diff(cu)
    starts = torch.repeat_interleave(cu[:-1], lens)
    pos = torch.arange(int(cu[-1]), device=cu.device) - starts
    return pos[None].expand(3, -1).contiguous()


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def rope(self, position_ids: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(main cos/sin [T, head_dim], indexer cos/sin [T, index_dim/2]) from M-RoPE positions [3, T]."""
        c = self.cfg
        main = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section)
        rot = c.dsa.index_dim // 2
        idx = mrope_cos_sin(position_ids, rot, c.rope_theta, scale_section(c.mrope_section, rot // 2))
        return main, idx

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        cache: KVCache | None = None,
    ) -> LMOutput:
        """inputs_embeds [T, H]; position_ids [3, T]; cu_seqlens int32 [B+1] (decode: one token per sequence)."""
        rope, rope_idx = self.rope(position_ids)
        dtype = inputs_embeds.dtype
        rope = (rope[0].to(dtype), rope[1].to(dtype))
        rope_idx = (rope_idx[0].to(dtype), rope_idx[1].to(dtype))
        x = inputs_embeds
        aux_losses, counts, kls = [], [], []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x, aux, cnt, kl = checkpoint(layer, x, rope, rope_idx, cu_seqlens, None, use_reentrant=False)
            else:
                x, aux, cnt, kl = layer(x, rope, rope_idx, cu_seqlens, cache)
            aux_losses.append(aux)
            counts.append(cnt)
            if kl is not None:
                kls.append(kl)
        return LMOutput(
            hidden=self.norm(x),
            aux_loss=torch.stack(aux_losses).mean(),
            indexer_loss=torch.stack(kls).sum() if kls else None,
            expert_counts=torch.stack(counts),
        )


def shifted_targets(labels: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Next-token targets in the packed layout: row t predicts labels[t+1] of the same sample, else -100."""
    targets = torch.full_like(labels, -100)
    targets[:-1] = labels[1:]
    ends = cu_seqlens[1:].to(torch.int64) - 1
    targets[ends[ends >= 0]] = -100
    return targets


def _ce_chunk(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def _ce_chunk_tokens(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def token_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """Per-target-token losses [n] (rows where targets != -100, in order), chunked like chunked_cross_entropy: for
    losses that weight tokens unequally (e.g. each sample's mean, keye.train's seq-mean-token-mean)."""
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    if targets.numel() == 0:
        return hidden.sum(-1) * 0.0
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = [
        checkpoint(_ce_chunk_tokens, *args, use_reentrant=False) if grad else _ce_chunk_tokens(*args)
        for args in (
            (hidden[s : s + chunk], weight, targets[s : s + chunk]) for s in range(0, targets.numel(), chunk)
        )
    ]
    return torch.cat(parts)


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 4096
) -> tuple[Tensor, int]:
    """(sum of token losses, number of target tokens) without keeping more than chunk x vocab logits alive."""
    keep = targets != -100
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for s in range(0, n, chunk):
        args = (hidden[s : s + chunk], weight, targets[s : s + chunk])
        total = total + (checkpoint(_ce_chunk, *args, use_reentrant=False) if grad else _ce_chunk(*args))
    return total, n
