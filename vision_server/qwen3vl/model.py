"""Qwen3-VL's vision tower: ViT on 3-D patches, 2x2 merger and DeepStack mergers.

Attribute names are the checkpoint's under `model.visual.` (patch_embed.proj,
pos_embed, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.linear_fc1,mlp.linear_fc2},
merger.{norm,linear_fc1,linear_fc2}, deepstack_merger_list.N.*), so the stored tensors with
that prefix removed load with `load_state_dict(strict=True)`.

The computation is that of transformers 5.19's `Qwen3VLVisionModel` and vLLM 0.32's
`Qwen3_VisionTransformer` (models/qwen3_vl/modeling_qwen3_vl.py, vision_utils.py;
model_executor/models/qwen3_vl.py), written here from what they compute:
- patch embedding: a Conv3d whose kernel is the whole (3, T, 16, 16) patch, i.e. a linear
  map of each flattened patch (computed as one);
- learned positions: a square `side x side` table, bilinearly resampled (align_corners)
  to each item's h x w patch grid, in the patches' merge-window order, the same for every
  temporal patch;
- 2-D rotary embedding: head_dim / 4 frequencies (theta 10000) for the patch row and as many
  for the column, concatenated and applied rotate-half style over the whole head;
- attention within each frame of each item only (cu_seqlens: one segment per temporal
  patch), never across items packed into one sequence;
- after block i in deepstack_visual_indexes, deepstack merger i turns the hidden states
  into LLM-width rows (LayerNorm after the 2x2 shuffle); after the last block, the merger
  does (LayerNorm before it).
Output: one row per merged token, [main | deepstack_1 | ... | deepstack_k] along the width
(vLLM's `torch.cat([merger] + deepstack, dim=1)`), rows in the input's patch order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dvd.checkpoint.qwen3vl_config import Qwen3VLVisionConfig
from vision_server.model import make_activation

LAYER_NORM_EPS = 1e-6
ROPE_THETA = 10000.0  # the vision rotary base (transformers' default; the releases set none)
Grid = tuple[int, int, int]


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C*T*p*p) -> (N, hidden): the Conv3d's one output per patch."""
        weight = self.proj.weight.flatten(1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        segments: Sequence[tuple[int, int, int]],
    ) -> torch.Tensor:
        """x (N, hidden); segments: (start, frames, patches per frame) runs of equal frames."""
        tokens, hidden = x.shape
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, -1).unbind(1)
        q, k = apply_rope(q, k, *rope)
        out = torch.empty_like(q)
        for start, frames, length in segments:
            end = start + frames * length
            attended = F.scaled_dot_product_attention(
                _frames(q[start:end], frames),
                _frames(k[start:end], frames),
                _frames(v[start:end], frames),
            )
            out[start:end] = attended.transpose(1, 2).flatten(0, 1)
        return self.proj(out.reshape(tokens, hidden))


class VisionMLP(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = make_activation(config.hidden_act)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen3VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        segments: Sequence[tuple[int, int, int]],
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 window's hidden states, concatenated -> one LLM-width row.

    The main merger normalises each patch before concatenating; DeepStack's
    (`postshuffle_norm`) normalises the concatenation.
    """

    def __init__(self, config: Qwen3VLVisionConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        norm_size = self.merged if postshuffle_norm else config.hidden_size
        self.norm = nn.LayerNorm(norm_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VLVisionTower(nn.Module):
    """`forward(pixel_values, grids)` -> rows (merged tokens, out_hidden * (1 + k))."""

    def __init__(self, config: Qwen3VLVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.merge = config.spatial_merge_size
        self.side = round(config.num_position_embeddings**0.5)
        self.deepstack_visual_indexes = list(config.deepstack_visual_indexes)
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle_norm=True) for _ in self.deepstack_visual_indexes
        )
        self.head_dim = config.hidden_size // config.num_heads

    @property
    def feature_width(self) -> int:
        return self.config.feature_width

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """Patches of several items, concatenated in `grids`' order -> their rows, same order."""
        self._check(pixel_values, grids)
        x = self.patch_embed(pixel_values)
        x = x + self._positions(grids).to(x.dtype)
        rope = self._rope(grids)
        segments = _segments(grids)
        deepstack = []
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, segments)
            if layer in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer)]
                deepstack.append(merger(x))
        return torch.cat([self.merger(x), *deepstack], dim=-1)

    def _check(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> None:
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != patches:
            raise ValueError(f"{pixel_values.shape[0]} patches given, the grids have {patches}")
        for t, h, w in grids:
            if t < 1 or h % self.merge or w % self.merge or h < 1 or w < 1:
                raise ValueError(f"grid {(t, h, w)} is not whole {self.merge}x{self.merge} windows")

    def _positions(self, grids: Sequence[Grid]) -> torch.Tensor:
        """Learned positions per patch, resampled to each grid, in merge-window order."""
        table = self.pos_embed.weight.float().view(self.side, self.side, -1)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        out = []
        for t, h, w in grids:
            if (h, w) not in cache:
                rows = _lerp(table, h, dim=0)  # (h, side, hidden)
                grid = _lerp(rows, w, dim=1)  # (h, w, hidden)
                cache[h, w] = self._window_order(grid).flatten(0, -2)
            out.append(cache[h, w].repeat(t, 1))
        return torch.cat(out)

    def _rope(self, grids: Sequence[Grid]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, head_dim) of each patch's (row, column), float32."""
        device = self.pos_embed.weight.device
        # head_dim / 4 frequencies, shared by the row and the column angle
        exponents = torch.arange(0, self.head_dim // 2, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / ROPE_THETA ** (exponents / (self.head_dim // 2))
        positions = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
            cols = torch.arange(w, device=device).view(1, w).expand(h, w)
            rc = self._window_order(torch.stack([rows, cols], dim=-1)).reshape(-1, 2)
            positions.append(rc.repeat(t, 1))
        rc = torch.cat(positions).float()
        angles = (rc[:, :, None] * inv_freq).flatten(1)  # (N, head_dim / 2): rows, then cols
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def _window_order(self, grid: torch.Tensor) -> torch.Tensor:
        """(h, w, ...) -> (h/m, w/m, m, m, ...): the patches' order within an item."""
        h, w, m = grid.shape[0], grid.shape[1], self.merge
        view = grid.reshape(h // m, m, w // m, m, *grid.shape[2:])
        return view.transpose(1, 2)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (N, heads, head_dim) rotated in float32, returned in their own dtype."""
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        first, second = x32.chunk(2, dim=-1)
        return (x32 * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def _lerp(table: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear resampling of `table` along `dim` to `size` points, ends on ends (align_corners)."""
    side = table.shape[dim]
    points = torch.linspace(0, side - 1, size, dtype=torch.float32, device=table.device)
    low = points.long()
    high = (low + 1).clamp(max=side - 1)
    frac = points - low
    shape = [1] * table.dim()
    shape[dim] = size
    frac = frac.view(shape)
    return table.index_select(dim, low) * (1 - frac) + table.index_select(dim, high) * frac


def _frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(frames * L, heads, d) -> (frames, heads, L, d): each frame one attention batch entry."""
    return x.reshape(frames, -1, *x.shape[1:]).transpose(1, 2)


def _segments(grids: Sequence[Grid]) -> list[tuple[int, int, int]]:
    """Attention runs: (first patch, frames, patches per frame) per item."""
    out, start = [], 0
    for t, h, w in grids:
        out.append((start, t, h * w))
        start += t * h * w
    return out
