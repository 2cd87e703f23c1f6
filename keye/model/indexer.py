"""DSA lightning indexer (DeepSeek-V3.2-Exp, inference/model.py `Indexer`), adapted to GQA as in Keye-VL-2.0.

Per token: H_I indexer queries, ONE indexer key shared by all indexer heads (LayerNorm-ed), per-head weights
scaled by 1/sqrt(H_I); RoPE (non-interleaved) on the first half of the indexer dims, the rest position-free.
Its input is detached by the attention module in `dsa` mode, so it learns only from its KL loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from keye.model.config import DSAConfig
from keye.model.rope import apply_rope


class LightningIndexer(nn.Module):
    def __init__(self, hidden: int, cfg: DSAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(hidden, cfg.index_heads * cfg.index_dim, bias=False)
        self.wk = nn.Linear(hidden, cfg.index_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.index_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden, cfg.index_heads, bias=False)

    @property
    def rope_dim(self) -> int:
        return self.cfg.index_dim // 2

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, H] -> (q_idx [T, H_I, D_I], k_idx [T, D_I], w [T, H_I]); cos/sin [T, D_I/2]."""
        t = x.shape[0]
        q = apply_rope(self.wq(x).view(t, self.cfg.index_heads, self.cfg.index_dim), cos, sin)
        k = apply_rope(self.k_norm(self.wk(x))[:, None, :], cos, sin)[:, 0]
        w = self.weights_proj(x) * self.cfg.index_heads**-0.5
        return q, k, w
