"""InternVL3.5-Flash's Visual Resolution Router (ViR) and its 1/16 projector.

Per tile, the router pools the ViT's last hidden state (CLS dropped) with cross-attention
from a learned query, runs a residual gating MLP, and gives two probabilities; index 0 is
"compress to 1/16". A compressed tile's 32x32 patch grid is pixel-shuffled by 1/4 straight
to 8x8 (64 tokens, 16x the channels) and projected by `mlp2`; the others take the usual
1/2 shuffle (256 tokens) and `mlp1`.

The published model code reuses attn2/norm2 for the third and fourth pooling steps
(attn3/attn4/norm3/norm4 are in the checkpoint but unused); this follows that code, since
the released weights were trained with it.
"""

from __future__ import annotations

import torch
from torch import nn

from dvd.checkpoint import FlashConfig

POOLING_HEADS = 16


class CrossAttentionPooling(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, dim))

        def attention() -> nn.MultiheadAttention:
            return nn.MultiheadAttention(dim, POOLING_HEADS, batch_first=True)

        self.attn1, self.attn2, self.attn3, self.attn4 = (attention() for _ in range(4))
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[tiles, tokens, dim] -> [tiles, dim]."""
        query = self.query_token.expand(tokens.shape[0], 1, -1)
        pooled = self.norm1(self.attn1(query, tokens, tokens, need_weights=False)[0])
        for _ in range(3):  # steps 2-4 all use attn2/norm2, as the released code does
            pooled = self.norm2(self.attn2(pooled, tokens, tokens, need_weights=False)[0])
        return pooled.squeeze(1)


class Gating(nn.Module):
    def __init__(self, dim: int, expansion: int = 4) -> None:
        super().__init__()
        for k in range(1, 5):
            block = nn.Sequential(
                nn.Linear(dim, dim * expansion),
                nn.GELU(),
                nn.Identity(),  # dropout at training time; keeps the checkpoint's indices
                nn.Linear(dim * expansion, dim),
                nn.Identity(),
                nn.LayerNorm(dim),
            )
            self.add_module(f"block{k}", block)
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[tiles, dim] -> probabilities [tiles, 2]; column 0 is "compress to 1/16"."""
        for k in range(1, 5):
            x = x + getattr(self, f"block{k}")(x)
        return self.gate(x).float().softmax(dim=-1)


def make_mlp2(vit_hidden: int, llm_hidden: int) -> nn.Sequential:
    merged = vit_hidden * 16
    return nn.Sequential(
        nn.LayerNorm(merged),
        nn.Linear(merged, 2 * llm_hidden),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(2 * llm_hidden, 2 * llm_hidden),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(2 * llm_hidden, llm_hidden),
    )


def route(compress_probability: torch.Tensor, flash: FlashConfig) -> torch.Tensor:
    """Which tiles of one request ViR compresses to 1/16.

    A tile is compressed when its probability is above the `relative_threshold` quantile
    of the request's tiles (linear interpolation) and at least `absolute_threshold`. The
    comparison with the quantile is strict, so a lone tile, or tiles that all score the
    same, are never compressed.
    """
    p = compress_probability.float()
    threshold = torch.quantile(p, flash.relative_threshold)
    return (p > threshold) & (p >= flash.absolute_threshold)
