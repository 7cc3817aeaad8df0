"""Sizes of the random-weight Qwen3-VL checkpoints that `qwen3vl_writer` writes.

Everything that is not a size is fixed to the real releases' values in the writer: 16 px
patches, 2-frame temporal patches, 2x2 spatial merge, GELU-tanh ViT with LayerNorms and
biases, three DeepStack levels, a Qwen3 LLM (q/k RMSNorm, no biases) with interleaved MRoPE
(rope_theta 5e6), and the releases' token ids relative to Qwen's first added token.

The real dense releases (their config.json): 2B and 4B have a 24-layer, 1024-wide ViT with
DeepStack at layers 5, 11, 17 and a tied head; 8B has a 27-layer, 1152-wide ViT with
DeepStack at 8, 16, 24 and an untied head. Every release has 3 DeepStack levels, so every
preset has 3 too: a row the vision tower sends is out_hidden_size x 4 wide.

"small" keeps Qwen3-VL-2B's balance between the two stages. Per LLM token (one merged 2x2
group of patches), 2B's ViT spends 24 layers x 12.6 M weights x 4 patches x 2 = 2.4 GFLOP and
its LLM 28 layers x 50.3 M weights x 2 = 2.8 GFLOP; small's ViT 6 x 0.79 M x 4 x 2 = 37.7
MFLOP and its LLM 6 x 3.15 M x 2 = 37.7 MFLOP (matmuls only, attention and merger aside).
"tiny" is only for tests: as small as vLLM's CPU attention allows (head_dim 32), with as many
LLM layers as DeepStack levels (DeepStack adds its features to the first k LLM layers).

"qwen3vl-moe-tiny" is tiny with a Qwen3-MoE LLM, as Qwen3-VL-30B-A3B / 235B-A22B: every layer's
MLP a sparse block (decoder_sparse_step 1, no mlp_only_layers) of `num_experts` experts of
width `moe_intermediate_size`, `num_experts_per_tok` routed per token, their top-k weights
renormalised (norm_topk_prob; 30B-A3B: 128 experts of 768, 8 per token; the vision tower is
the dense releases'). Written by transformers' `Qwen3VLMoeForConditionalGeneration`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dvd.checkpoint.presets import check_attention_shapes


@dataclass(frozen=True)
class Qwen3VLPreset:
    """Hyper-parameters of one random-weight Qwen3-VL-like checkpoint."""

    name: str
    # vision tower
    vit_depth: int
    vit_hidden: int
    vit_heads: int
    vit_intermediate: int
    deepstack_visual_indexes: tuple[int, ...]
    num_position_embeddings: int  # a square grid of learned positions, interpolated
    # Qwen3 LLM
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_intermediate: int
    llm_max_position_embeddings: int
    mrope_section: tuple[int, int, int]  # (t, h, w) rotary pairs; sums to head_dim / 2
    tie_word_embeddings: bool
    # Qwen3-MoE LLM (0 experts: the dense Qwen3 LLM)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    # fixed by Qwen3-VL; kept here so token counts below are self-contained
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2

    def __post_init__(self) -> None:
        check_attention_shapes(
            self.vit_hidden, self.vit_heads, self.llm_heads, self.llm_kv_heads, self.llm_head_dim
        )
        if sum(self.mrope_section) * 2 != self.llm_head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} does not sum to head_dim / 2")
        if any(not 0 <= i < self.vit_depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} not in ViT")
        if len(self.deepstack_visual_indexes) > self.llm_layers:
            raise ValueError("DeepStack needs at least one LLM layer per level")
        if round(self.num_position_embeddings**0.5) ** 2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} not square")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_experts}"
            )
        if self.is_moe and self.moe_intermediate_size < 1:
            raise ValueError("moe_intermediate_size: an MoE preset needs a positive width")

    @property
    def is_moe(self) -> bool:
        """Whether the LLM is Qwen3-MoE (Qwen3-VL-30B-A3B's kind) rather than dense Qwen3."""
        return self.num_experts > 0

    @property
    def feature_width(self) -> int:
        """Width of one vision row: the main features and one block per DeepStack level."""
        return self.llm_hidden * (1 + len(self.deepstack_visual_indexes))


_TINY = Qwen3VLPreset(
    name="qwen3vl-tiny",
    vit_depth=4,
    vit_hidden=64,
    vit_heads=2,
    vit_intermediate=128,
    deepstack_visual_indexes=(0, 1, 2),
    num_position_embeddings=256,
    llm_hidden=64,
    llm_layers=3,
    llm_heads=2,
    llm_kv_heads=1,
    llm_head_dim=32,
    llm_intermediate=128,
    llm_max_position_embeddings=8192,
    mrope_section=(6, 5, 5),
    tie_word_embeddings=False,
)


QWEN3VL_PRESETS: dict[str, Qwen3VLPreset] = {
    "qwen3vl-tiny": _TINY,
    "qwen3vl-small": Qwen3VLPreset(
        name="qwen3vl-small",
        vit_depth=6,
        vit_hidden=256,
        vit_heads=4,
        vit_intermediate=1024,
        deepstack_visual_indexes=(1, 2, 3),
        num_position_embeddings=1024,
        llm_hidden=512,
        llm_layers=6,
        llm_heads=8,
        llm_kv_heads=4,
        llm_head_dim=64,
        llm_intermediate=1536,
        llm_max_position_embeddings=16384,
        mrope_section=(12, 10, 10),
        tie_word_embeddings=True,  # as Qwen3-VL-2B
    ),
    # tiny's vision tower and attention with sparse layers: the LLM's MLPs become 8 experts
    "qwen3vl-moe-tiny": replace(
        _TINY,
        name="qwen3vl-moe-tiny",
        # llm_intermediate stays: unused by sparse layers, but the releases keep the key;
        # tie_word_embeddings stays False, as 30B-A3B
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,  # 2 x 16 != 64: each expert tensor's orientation is plain
    ),
}


def get_qwen3vl_preset(name: str) -> Qwen3VLPreset:
    """The Qwen3-VL preset called `name`; ValueError listing the known ones otherwise."""
    try:
        return QWEN3VL_PRESETS[name]
    except KeyError:
        raise ValueError(f"preset {name!r} is not one of {sorted(QWEN3VL_PRESETS)}") from None
