"""Sizes of the random-weight checkpoints that `make_checkpoint` writes.

Everything that is not a size (downsample ratio 0.5, 448 px tiles of 14 px patches, pixel
shuffle v2, GELU MLPs, Qwen3 with q/k RMSNorm) is fixed to InternVL3.5's real values in
`config_files.py`; a preset only says how big the two towers are.

Why "small" has the sizes it has. In InternVL3.5-2B (InternViT-300M + Qwen3-1.7B) one 448 px
tile costs the ViT about as much as the LLM's prefill of that tile's 256 tokens:

- ViT: 24 layers x 12.6 M weights x 1025 tokens x 2 = 620 GFLOP, + attention 4 x 1025^2 x
  1024 x 24 = 103 GFLOP; about 720 GFLOP.
- LLM: 28 layers x 50.3 M weights x 256 tokens x 2 = 721 GFLOP (+ 4 x 256^2 x 2048 x 28 = 15
  GFLOP of attention).

"small" keeps that 1:1 proportion at a size a CPU runs in tens of milliseconds (see
`vit_flops_per_tile` / `llm_flops_per_tile`: about 10.8 vs 10.5 GFLOP), so a CPU benchmark
of the split deployment has the same balance between its two stages as a real 2B model.
"tiny" is only for tests: as small as vLLM's CPU attention allows (head_dim 32).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vLLM's CPU backend supports: every preset's LLM uses one."""


def check_attention_shapes(
    vit_hidden: int, vit_heads: int, llm_heads: int, llm_kv_heads: int, llm_head_dim: int
) -> None:
    """The head arithmetic every preset (InternVL's, Qwen3-VL's) must satisfy."""
    if vit_hidden % vit_heads:
        raise ValueError(f"vit_hidden {vit_hidden} is not a multiple of vit_heads")
    if llm_heads % llm_kv_heads:
        raise ValueError(f"llm_heads {llm_heads} is not a multiple of llm_kv_heads")
    # vLLM's CPU attention backend supports only these head sizes; another size starts and
    # then kills the engine on the first request.
    if llm_head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"llm_head_dim {llm_head_dim} is not supported by vLLM on CPU")


VIR_POOLING_HEADS = 16
"""InternVL3.5-Flash's router pools each tile with 16-head cross-attention (fixed in its code)."""


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one random-weight InternVL3.5-like checkpoint."""

    name: str
    # InternViT
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_intermediate: int
    vit_norm_type: str  # "layer_norm" (InternViT-300M) | "rms_norm" (InternViT-6B)
    vit_qkv_bias: bool
    vit_qk_normalization: bool
    # Qwen3 LLM
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_intermediate: int
    llm_max_position_embeddings: int
    tie_word_embeddings: bool
    # The LLM family: "qwen3" (InternVL3.5) or "qwen2" (InternVL2.5/3, and transformers'
    # default text_config), whose layers differ (q/k norms vs q/k/v biases).
    llm_model_type: str = "qwen3"
    # InternVL3.5-Flash: the Visual Resolution Router and its thresholds (None: no ViR)
    flash_thresholds: tuple[float, float] | None = None  # (relative, absolute)
    # fixed by InternVL3.5; kept here so the FLOP estimates below are self-contained
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5

    def __post_init__(self) -> None:
        check_attention_shapes(
            self.vit_hidden, self.vit_heads, self.llm_heads, self.llm_kv_heads, self.llm_head_dim
        )
        if self.flash_thresholds is not None and self.vit_hidden % VIR_POOLING_HEADS:
            raise ValueError(
                f"vit_hidden {self.vit_hidden} is not a multiple of ViR's "
                f"{VIR_POOLING_HEADS} pooling heads"
            )
        if self.llm_model_type not in ("qwen3", "qwen2"):
            raise ValueError(f"llm_model_type {self.llm_model_type!r} is not qwen3|qwen2")
        if self.llm_model_type == "qwen2" and self.llm_heads * self.llm_head_dim != self.llm_hidden:
            raise ValueError("a qwen2 LLM's head_dim is llm_hidden / llm_heads")
        if self.vit_norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vit_norm_type {self.vit_norm_type!r} is not layer_norm|rms_norm")

    @property
    def vit_tokens(self) -> int:
        """Tokens the ViT sees per tile: patches + the class token (1025 for 448/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per tile after pixel shuffle (256 for 448/14/0.5)."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    def vit_flops_per_tile(self) -> float:
        """Forward FLOPs of the ViT over one tile (matmuls only)."""
        d, n = self.vit_hidden, self.vit_tokens
        weights = 4 * d * d + 2 * d * self.vit_intermediate
        return self.vit_layers * (2 * weights * n + 4 * n * n * d)

    def llm_flops_per_tile(self) -> float:
        """Forward FLOPs of the LLM prefill over one tile's tokens (matmuls only)."""
        h, n = self.llm_hidden, self.tokens_per_tile
        q = self.llm_heads * self.llm_head_dim
        kv = self.llm_kv_heads * self.llm_head_dim
        weights = 2 * h * q + 2 * h * kv + 3 * h * self.llm_intermediate
        return self.llm_layers * (2 * weights * n + 4 * n * n * q)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vit_hidden=64,
        vit_layers=2,
        vit_heads=2,
        vit_intermediate=128,
        vit_norm_type="layer_norm",
        vit_qkv_bias=True,
        vit_qk_normalization=False,
        llm_hidden=64,
        llm_layers=2,
        llm_heads=2,
        llm_kv_heads=1,
        llm_head_dim=32,
        llm_intermediate=128,
        llm_max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "small": Preset(
        name="small",
        vit_hidden=256,
        vit_layers=4,
        vit_heads=4,
        vit_intermediate=1024,
        vit_norm_type="layer_norm",
        vit_qkv_bias=True,
        vit_qk_normalization=False,
        llm_hidden=512,
        llm_layers=6,
        llm_heads=8,
        llm_kv_heads=4,
        llm_head_dim=64,
        llm_intermediate=1536,
        llm_max_position_embeddings=16384,
        tie_word_embeddings=False,
    ),
}


# The tiny router's thresholds: the median of a request's tiles and a low absolute bar, so a
# many-tile image gets a mix of 1/4 and 1/16 tiles. The real releases' values are read from
# their config.json; these are only for tests.
PRESETS["tiny-flash"] = replace(PRESETS["tiny"], name="tiny-flash", flash_thresholds=(0.5, 0.05))
PRESETS["small-flash"] = replace(PRESETS["small"], name="small-flash", flash_thresholds=(0.5, 0.05))

# Test variants of "tiny" for the ways real checkpoints differ: a head tied to the embedding
# table (transformers' InternVLConfig default, written as no lm_head tensor at all) and a
# Qwen2 LLM (InternVL3's, and what an -HF text_config without model_type means).
PRESETS["tiny-tied"] = replace(PRESETS["tiny"], name="tiny-tied", tie_word_embeddings=True)
PRESETS["tiny-qwen2"] = replace(PRESETS["tiny"], name="tiny-qwen2", llm_model_type="qwen2")


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset {name!r} is not one of {sorted(PRESETS)}") from None
