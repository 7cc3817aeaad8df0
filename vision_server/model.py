"""InternViT, pixel shuffle and the MLP projector, with the original checkpoint's names.

Module attribute names mirror the original InternVL3.5 layout (`vision_model.*`, `mlp1.*`)
so `load_state_dict` takes `CheckpointWeights.vision_state_dict()` as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvd.checkpoint import InternVLConfig, VisionConfig
from vision_server.tile_features import TileFeatures
from vision_server.vir import CrossAttentionPooling, Gating, make_mlp2


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: VisionConfig, size: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(size, config.layer_norm_eps)
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(size, eps=config.layer_norm_eps)
    raise ValueError(f"vision_config.norm_type {config.norm_type!r} is not supported")


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"vision_config.hidden_act {name!r} is not supported")


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, hidden))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, hidden, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        if patches.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"tiles must be {self.grid} patches a side, got {patches.shape[-2:]}")
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        if hidden % self.num_heads:
            raise ValueError("vision_config.hidden_size must be divisible by num_attention_heads")
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden, hidden)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = RMSNorm(hidden, config.layer_norm_eps)
            self.k_norm = RMSNorm(hidden, config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            # InternViT-6B normalises q and k over all heads together, before the split.
            q, k = self.q_norm(q), self.k_norm(k)
        head_dim = hidden // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, hidden))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = make_activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.norm1 = make_norm(config, hidden)
        self.attn = VisionAttention(config)
        self.ls1 = nn.Parameter(torch.ones(hidden))
        self.norm2 = make_norm(config, hidden)
        self.mlp = VisionMLP(config)
        self.ls2 = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoderLayers(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoderLayers(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden states after layer `select_layer` (-1: the last), CLS token included."""
        x = self.embeddings(pixel_values)
        layers = self.encoder.layers
        stop = len(layers) + 1 + select_layer if select_layer < 0 else select_layer
        for layer in layers[:stop]:
            x = layer(x)
        return x


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """[N, W, H, C] -> [N, W*scale, H*scale, C/scale^2] the way InternVL's ps_version v2 does."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class InternVLVision(nn.Module):
    """ViT + pixel shuffle + mlp1 (and, on -Flash checkpoints, ViR + mlp2).

    `forward`: tiles [B, 3, 448, 448] -> 1/4-resolution features [B, 256, llm_hidden].
    `encode_tiles` adds the 1/16 features and the router's probabilities when asked.
    """

    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        if config.ps_version != "v2":
            raise ValueError(f"ps_version {config.ps_version!r} is not supported (only v2)")
        self.select_layer = config.select_layer
        self.scale = config.downsample_ratio
        vit_hidden = config.vision.hidden_size
        merged = int(vit_hidden / (self.scale * self.scale))
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged),
            nn.Linear(merged, config.llm_hidden_size),
            nn.GELU(),
            nn.Linear(config.llm_hidden_size, config.llm_hidden_size),
        )
        self.has_router = config.has_router
        if self.has_router:
            if self.select_layer != -1:
                raise ValueError("ViR reads the ViT's last layer; select_layer must be -1")
            self.mlp2 = make_mlp2(vit_hidden, config.llm_hidden_size)
            self.pooling_before_gating = CrossAttentionPooling(vit_hidden)
            self.gating = Gating(vit_hidden)

    def _patch_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT output without the CLS token, as [B, side, side, vit_hidden]."""
        hidden = self.vision_model(pixel_values, self.select_layer)[:, 1:, :]
        side = int(hidden.shape[1] ** 0.5)
        return hidden.reshape(hidden.shape[0], side, side, -1)

    def _project(self, grid: torch.Tensor, scale: float, mlp: nn.Module) -> torch.Tensor:
        shuffled = pixel_shuffle(grid, scale)
        return mlp(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._project(self._patch_grid(pixel_values), self.scale, self.mlp1)

    def encode_tiles(self, pixel_values: torch.Tensor, with_vir: bool) -> TileFeatures:
        grid = self._patch_grid(pixel_values)
        quarter = self._project(grid, self.scale, self.mlp1)
        if not with_vir:
            return TileFeatures(quarter)
        if not self.has_router:
            raise ValueError("this checkpoint has no ViR (not an InternVL3.5-Flash model)")
        sixteenth = self._project(grid, self.scale * self.scale, self.mlp2)
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        probability = self.gating(self.pooling_before_gating(tokens))[:, 0]
        return TileFeatures(quarter, sixteenth, probability)
