"""Keye-VL: ViT -> projector -> Qwen3-MoE LM; placeholder token rows are replaced by projected visual tokens.

Follows Keye-VL-1.5 / Keye-VL-2.0 (arXiv 2509.01563, 2606.10651) and the Qwen2-VL forward (image-token scatter,
M-RoPE positions). The packed-batch calling convention is documented in keye/model/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keye.model.cache import KVCache
from keye.model.config import ModelConfig
from keye.model.lm import (
    LanguageModel,
    chunked_cross_entropy,
    default_cu_seqlens,
    default_position_ids,
    shifted_targets,
)
from keye.model.moe import MoE
from keye.model.norm import RMSNorm
from keye.model.projector import Projector
from keye.model.vit import VisionTransformer, frame_grids


@torch.no_grad()
def init_module_weights(module: nn.Module, std: float = 0.02) -> None:
    """Qwen-style init (normal 0.02, zero biases, unit norms, experts normal); skips parameters on the meta device."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Embedding) and m.weight.device.type != "meta":
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm | RMSNorm) and m.weight.device.type != "meta":
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, MoE):
            m.reset_expert_parameters(std)


@dataclass
class ModelOutput:
    logits: Tensor | None  # [B, S, V] for 2-D input_ids, [T, V] for packed input; None when not requested
    loss: Tensor | None = None  # lm_loss + router_aux_loss_coef * aux_loss + indexer_loss (when labels given)
    lm_loss: Tensor | None = None  # mean next-token cross entropy over target tokens
    aux_loss: Tensor | None = None  # load-balancing loss, mean over layers (unweighted)
    indexer_loss: Tensor | None = (
        None  # DSA indexer KL summed over layers (dsa_warmup / dsa layers, training)
    )
    expert_counts: Tensor | None = None  # int64 [layers, E]
    num_tokens: int = 0  # target tokens behind lm_loss
    hidden: Tensor | None = None  # [T, H] final hidden states (after the last norm), e.g. for per-task losses

    def __getitem__(self, key: str) -> object:
        return getattr(self, key)


class KeyeVL(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.projector = Projector(
            config.vision.hidden_size,
            config.lm.hidden_size,
            config.projector_hidden,
            config.vision.spatial_merge,
            center=config.center_visual_tokens,
        )
        self.lm = LanguageModel(config.lm)
        # set by the trainer's mesh (keye.train.sharded_training); None / False: one device, whole packs
        self.cp = None  # keye.model.context_parallel.CPContext: forward takes this rank's rows of the pack
        self.vision_group = None  # ProcessGroup: the ViT runs apart, on frames dealt over the group
        self.vision_always = False  # run the ViT on every forward (FSDP: every rank enters every unit)

    # ------------------------------------------------------------------------------------------ init
    def init_weights(self, std: float = 0.02) -> None:
        init_module_weights(self, std)

    # ------------------------------------------------------------------------------------------ forward
    def embed(
        self,
        input_ids: Tensor,
        pixel_patches: Tensor | None = None,
        patch_grids: Tensor | None = None,
        vision_cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings [T, H] with every image_token_id row replaced, in order, by a projected visual token."""
        x = self.lm.embed_tokens(input_ids)
        if self.vision_group is not None:
            from keye.model.vision_parallel import place_visual

            return place_visual(self, x, input_ids, pixel_patches, patch_grids)
        if pixel_patches is None:
            return x + self.vision_keepalive(x) if self.vision_always else x
        if patch_grids is None:
            raise ValueError("pixel_patches given without patch_grids")
        grids = frame_grids(patch_grids)
        feats = self.vision(pixel_patches, patch_grids, vision_cu_seqlens)
        visual = self.projector(feats, grids).to(x.dtype)
        mask = input_ids == self.config.image_token_id
        n = int(mask.sum())
        if n != visual.shape[0]:
            raise ValueError(
                f"{n} image placeholder tokens but the frames give {visual.shape[0]} visual tokens"
            )
        return x.masked_scatter(mask[:, None], visual)

    def vision_keepalive(self, like: Tensor) -> Tensor:
        """A zero of like's dtype that went through the ViT and the projector (one blank frame of the smallest
        grid): under FSDP a rank without frames must still enter the vision units the other ranks enter."""
        m = self.config.vision.spatial_merge
        dim = self.config.vision.in_channels * self.config.vision.patch_size**2
        blank = like.new_zeros((m * m, dim), dtype=self.vision.post_layernorm.weight.dtype)
        grids = torch.tensor([[1, m, m]], dtype=torch.int64, device=like.device)
        visual = self.projector(self.vision(blank, grids), [(m, m)])
        return (visual.sum() * 0).to(like.dtype)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        labels: Tensor | None = None,
        pixel_patches: Tensor | None = None,
        patch_grids: Tensor | None = None,
        vision_cu_seqlens: Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool | None = None,
        loss_chunk: int = 4096,
        logits_index: Tensor | None = None,
    ) -> ModelOutput:
        """See the module docstring of keye.model. `logits_index` (rows of the packed input) limits the logits to
        those rows, e.g. the last prompt token of each sequence during generation; it returns [len(index), V]."""
        batched = input_ids.dim() == 2
        if batched:  # (B, S): every row one full sample, no padding
            b, s = input_ids.shape
            input_ids = input_ids.reshape(-1)
            if cu_seqlens is None:
                cu_seqlens = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=input_ids.device)
            if labels is not None:
                labels = labels.reshape(-1)
            if position_ids is not None and position_ids.dim() == 3:  # [3, B, S]
                position_ids = position_ids.reshape(3, -1)
        if cu_seqlens is None:
            cu_seqlens = default_cu_seqlens(input_ids.shape[0], input_ids.device)
        if position_ids is None:
            position_ids = default_position_ids(cu_seqlens)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(3, -1)
        x = self.embed(input_ids, pixel_patches, patch_grids, vision_cu_seqlens)
        rows = None
        if self.cp is not None:  # context parallel: this rank's rows of the (padded) pack
            rows = self.cp.rows.to(x.device)
            x, position_ids = x[rows], position_ids[:, rows]
        out = self.lm(x, position_ids, cu_seqlens, cache)
        want_logits = labels is None if return_logits is None else return_logits
        logits = None
        if logits_index is not None:
            logits = self.lm.lm_head(out.hidden[logits_index])
        elif want_logits:
            logits = self.lm.lm_head(out.hidden)
            if batched:
                logits = logits.view(b, s, -1)
        result = ModelOutput(
            logits=logits,
            aux_loss=out.aux_loss,
            indexer_loss=out.indexer_loss,
            expert_counts=out.expert_counts,
            hidden=out.hidden,
        )
        if labels is not None:
            targets = shifted_targets(labels, cu_seqlens)
            if rows is not None:
                targets = targets[rows]
            total, n = chunked_cross_entropy(out.hidden, self.lm.lm_head.weight, targets, loss_chunk)
            lm_loss = total / max(1, n)
            loss = lm_loss + self.config.lm.router_aux_loss_coef * out.aux_loss
            if out.indexer_loss is not None:
                loss = loss + out.indexer_loss
            result.lm_loss, result.loss, result.num_tokens = lm_loss, loss, n
        return result

    # ------------------------------------------------------------------------------------------ helpers
    def set_attention_mode(self, mode: str, layers: list[int] | None = None) -> None:
        self.config.set_attention_mode(mode, layers)

    def indexer_parameters(self) -> list[nn.Parameter]:
        """The DSA lightning indexers' parameters: the only ones trained in the dsa_warmup stage."""
        return [p for name, p in self.named_parameters() if ".indexer." in name]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.lm.gradient_checkpointing = enabled
        self.vision.gradient_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.embed_tokens.weight.dtype
