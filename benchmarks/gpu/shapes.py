"""The ViT shapes measured on the GPU, as the project's own configs built in code.

InternViT-300M (InternVL3.5-1B..8B, here with an 8B-class LLM: projector out 4096) and
InternViT-6B (InternVL3.5-38B and up: projector out 5120), both at 448 px tiles of 14 px
patches, pixel shuffle 0.5 (256 tokens per tile). The sizes are those of OpenGVLab's
InternViT-300M-448px-V2_5 and InternViT-6B-448px-V2_5 configs. `tiny` is for `--cpu-smoke`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvd.checkpoint import InternVLConfig, VisionConfig


@dataclass(frozen=True)
class VitShape:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    norm_type: str
    qkv_bias: bool
    qk_normalization: bool
    llm_hidden: int
    """The projector's output width (the LLM's hidden size)."""
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5

    @property
    def tokens(self) -> int:
        """ViT tokens per tile: patches + CLS (1025 at 448/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def tokens_out(self) -> int:
        """Feature rows per tile after pixel shuffle (256)."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    def vision_config(self) -> VisionConfig:
        return VisionConfig(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            image_size=self.image_size,
            patch_size=self.patch_size,
            layer_norm_eps=1e-6,
            norm_type=self.norm_type,
            qkv_bias=self.qkv_bias,
            qk_normalization=self.qk_normalization,
            hidden_act="gelu",
            num_channels=3,
        )

    def internvl_config(self) -> InternVLConfig:
        """What `vision_server.model.InternVLVision` needs; no checkpoint on disk."""
        return InternVLConfig(
            path=Path(f"<in-code {self.name}>"),
            layout="original",
            vision=self.vision_config(),
            llm_config={"hidden_size": self.llm_hidden},
            downsample_ratio=self.downsample_ratio,
            ps_version="v2",
            select_layer=-1,
            template=None,
            min_dynamic_patch=1,
            max_dynamic_patch=12,
            use_thumbnail=True,
            image_size=self.image_size,
        )

    def flops_per_tile(self) -> float:
        """Forward FLOPs of one tile: patch embedding, ViT (matmuls + attention), mlp1."""
        d, n, p = self.hidden, self.tokens, self.patch_size
        patch = 2 * (3 * p * p) * d * (n - 1)
        weights = 4 * d * d + 2 * d * self.intermediate
        vit = self.layers * (2 * weights * n + 4 * n * n * d)
        merged = int(d / self.downsample_ratio**2)
        projector = 2 * self.tokens_out * (merged * self.llm_hidden + self.llm_hidden**2)
        return float(patch + vit + projector)

    def feature_bytes(self, tiles: int) -> int:
        """bf16 feature bytes of `tiles` tiles (what the vision server sends)."""
        return tiles * self.tokens_out * self.llm_hidden * 2


SHAPES = {
    "internvit-300m": VitShape(
        "internvit-300m", 1024, 24, 16, 4096, "layer_norm", True, False, llm_hidden=4096
    ),
    "internvit-6b": VitShape(
        "internvit-6b", 3200, 45, 25, 12800, "rms_norm", False, True, llm_hidden=5120
    ),
}
TINY = {
    "tiny": VitShape("tiny", 64, 2, 2, 128, "layer_norm", True, False, llm_hidden=64),
    "tiny-6b-like": VitShape("tiny-6b-like", 64, 2, 2, 128, "rms_norm", False, True, llm_hidden=96),
}
BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
SMOKE_BATCHES: tuple[int, ...] = (1, 2)
