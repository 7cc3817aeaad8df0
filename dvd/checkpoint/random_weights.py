"""Deterministic random weights for a preset, in original-layout names.

The -HF layout is written from the same tensors (renamed, qkv split), so both layouts of one
seed hold the same model. Scales are chosen so that activations stay O(1) through the
towers (weights ~ 1/sqrt(fan_in)), and so that the tiny LLM's logits are peaked: embeddings
and lm_head have std 1, which makes greedy decoding follow the context instead of repeating
one token forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dvd.checkpoint.presets import Preset

if TYPE_CHECKING:
    import torch


class _Init:
    """Draws tensors in a fixed order from one seeded generator."""

    def __init__(self, seed: int) -> None:
        import torch

        self.torch = torch
        self.generator = torch.Generator().manual_seed(seed)
        self.out: dict[str, torch.Tensor] = {}

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        t = self.torch.randn(*shape, generator=self.generator) * std + mean
        self.out[name] = t

    def uniform(self, name: str, shape: tuple[int, ...], low: float, high: float) -> None:
        t = self.torch.rand(*shape, generator=self.generator) * (high - low) + low
        self.out[name] = t

    def linear(self, name: str, fan_out: int, fan_in: int, bias: bool) -> None:
        self.normal(f"{name}.weight", (fan_out, fan_in), 1 / math.sqrt(fan_in))
        if bias:
            self.normal(f"{name}.bias", (fan_out,), 0.02)

    def norm(self, name: str, size: int, bias: bool) -> None:
        """Norm weights near 1 and biases near 0, with noise so no tensor is trivial."""
        self.normal(f"{name}.weight", (size,), 0.02, mean=1.0)
        if bias:
            self.normal(f"{name}.bias", (size,), 0.02)


def random_state_dict(
    preset: Preset, vocab_size: int, muted: Iterable[int], seed: int
) -> dict[str, torch.Tensor]:
    """Original-layout state dict (float32).

    The lm_head rows of the `muted` ids are zero: their logit is 0 while the live ones'
    spread over +-3*sqrt(hidden), so greedy decoding never picks them. Muting the padding
    rows (ids the tokenizer lacks) and the added tokens other than EOS keeps a random model
    from emitting undecodable ids or <IMG_CONTEXT>-like markup, as a trained one would not.
    """
    init = _Init(seed)
    _vision(init, preset)
    _projector(init, preset)
    if preset.flash_thresholds is not None:
        _vir(init, preset)
    _llm(init, preset, vocab_size)
    state = init.out
    # A tied head is the embedding table: zeroing its rows mutes those ids as outputs (and
    # makes them zero inputs, so the caller leaves out the ids prompts contain).
    head = "language_model.model.embed_tokens.weight"
    if not preset.tie_word_embeddings:
        head = "language_model.lm_head.weight"
    state[head][list(muted)] = 0.0
    return state


def _vision(init: _Init, p: Preset) -> None:
    d = p.vit_hidden
    patches = (p.image_size // p.patch_size) ** 2
    layer_norm = p.vit_norm_type == "layer_norm"
    init.normal("vision_model.embeddings.class_embedding", (1, 1, d), 0.5)
    # pixels are normalized to ~N(0, 1): 1/sqrt(3*14*14) keeps patch features ~N(0, 1)
    fan_in = 3 * p.patch_size * p.patch_size
    init.normal(
        "vision_model.embeddings.patch_embedding.weight",
        (d, 3, p.patch_size, p.patch_size),
        1 / math.sqrt(fan_in),
    )
    init.normal("vision_model.embeddings.patch_embedding.bias", (d,), 0.02)
    init.normal("vision_model.embeddings.position_embedding", (1, patches + 1, d), 0.5)
    for i in range(p.vit_layers):
        prefix = f"vision_model.encoder.layers.{i}"
        init.linear(f"{prefix}.attn.qkv", 3 * d, d, bias=p.vit_qkv_bias)
        if p.vit_qk_normalization:
            # InternViT's q/k RMSNorm spans the whole hidden size, weight only.
            init.norm(f"{prefix}.attn.q_norm", d, bias=False)
            init.norm(f"{prefix}.attn.k_norm", d, bias=False)
        init.linear(f"{prefix}.attn.proj", d, d, bias=True)
        # layer scale: InternViT-300M's trained values span roughly 0.1..1
        init.uniform(f"{prefix}.ls1", (d,), 0.1, 1.0)
        init.uniform(f"{prefix}.ls2", (d,), 0.1, 1.0)
        init.norm(f"{prefix}.norm1", d, bias=layer_norm)
        init.norm(f"{prefix}.norm2", d, bias=layer_norm)
        init.linear(f"{prefix}.mlp.fc1", p.vit_intermediate, d, bias=True)
        init.linear(f"{prefix}.mlp.fc2", d, p.vit_intermediate, bias=True)


def _projector(init: _Init, p: Preset) -> None:
    """mlp1 = LayerNorm(4d) -> Linear(4d, h) -> GELU -> Linear(h, h) (vLLM's _init_mlp1)."""
    shuffled = p.vit_hidden * int(1 / p.downsample_ratio) ** 2
    init.norm("mlp1.0", shuffled, bias=True)
    init.linear("mlp1.1", p.llm_hidden, shuffled, bias=True)
    init.linear("mlp1.3", p.llm_hidden, p.llm_hidden, bias=True)


def _vir(init: _Init, p: Preset) -> None:
    """InternVL3.5-Flash's router and 1/16 projector, with the original code's names.

    mlp2 = LayerNorm(16d) -> Linear(16d, 2h) -> GELU -> Dropout -> Linear(2h, 2h) -> GELU ->
    Dropout -> Linear(2h, h). pooling_before_gating: a learned query and four
    nn.MultiheadAttention + LayerNorm pairs. gating: four residual blocks (Linear(d, 4d) ->
    GELU -> Dropout -> Linear(4d, d) -> Dropout -> LayerNorm(d)) and a LayerNorm + Linear(d, 2)
    gate. The gate's weights are wide so that tiles get clearly different probabilities.
    """
    d, h = p.vit_hidden, p.llm_hidden
    shuffled = d * 16
    init.norm("mlp2.0", shuffled, bias=True)
    init.linear("mlp2.1", 2 * h, shuffled, bias=True)
    init.linear("mlp2.4", 2 * h, 2 * h, bias=True)
    init.linear("mlp2.7", h, 2 * h, bias=True)
    init.normal("pooling_before_gating.query_token", (1, d), 1.0)
    for k in range(1, 5):
        prefix = f"pooling_before_gating.attn{k}"
        init.normal(f"{prefix}.in_proj_weight", (3 * d, d), 1 / math.sqrt(d))
        init.normal(f"{prefix}.in_proj_bias", (3 * d,), 0.02)
        init.linear(f"{prefix}.out_proj", d, d, bias=True)
        init.norm(f"pooling_before_gating.norm{k}", d, bias=True)
    for k in range(1, 5):
        prefix = f"gating.block{k}"
        init.linear(f"{prefix}.0", 4 * d, d, bias=True)
        init.linear(f"{prefix}.3", d, 4 * d, bias=True)
        init.norm(f"{prefix}.5", d, bias=True)
    init.norm("gating.gate.0", d, bias=True)
    init.normal("gating.gate.1.weight", (2, d), 4 / math.sqrt(d))
    init.normal("gating.gate.1.bias", (2,), 0.02)


def _llm(init: _Init, p: Preset, vocab_size: int) -> None:
    h = p.llm_hidden
    q = p.llm_heads * p.llm_head_dim
    kv = p.llm_kv_heads * p.llm_head_dim
    init.normal("language_model.model.embed_tokens.weight", (vocab_size, h), 1.0)
    for i in range(p.llm_layers):
        prefix = f"language_model.model.layers.{i}"
        # Qwen2 has q/k/v biases; Qwen3 has none but RMSNorms on q and k per head.
        qwen2 = p.llm_model_type == "qwen2"
        init.linear(f"{prefix}.self_attn.q_proj", q, h, bias=qwen2)
        init.linear(f"{prefix}.self_attn.k_proj", kv, h, bias=qwen2)
        init.linear(f"{prefix}.self_attn.v_proj", kv, h, bias=qwen2)
        init.linear(f"{prefix}.self_attn.o_proj", h, q, bias=False)
        if not qwen2:
            init.norm(f"{prefix}.self_attn.q_norm", p.llm_head_dim, bias=False)
            init.norm(f"{prefix}.self_attn.k_norm", p.llm_head_dim, bias=False)
        init.linear(f"{prefix}.mlp.gate_proj", p.llm_intermediate, h, bias=False)
        init.linear(f"{prefix}.mlp.up_proj", p.llm_intermediate, h, bias=False)
        init.linear(f"{prefix}.mlp.down_proj", h, p.llm_intermediate, bias=False)
        init.norm(f"{prefix}.input_layernorm", h, bias=False)
        init.norm(f"{prefix}.post_attention_layernorm", h, bias=False)
    init.norm("language_model.model.norm", h, bias=False)
    if not p.tie_word_embeddings:
        init.normal("language_model.lm_head.weight", (vocab_size, h), 1.0)


def to_hf(state: dict[str, torch.Tensor], vit_hidden: int) -> dict[str, torch.Tensor]:
    """The same tensors under -HF names (attn.qkv split into q/k/v along the output dim)."""
    from dvd.checkpoint.names import original_to_hf

    out = {}
    for name, tensor in state.items():
        target = original_to_hf(name)
        if isinstance(target, list):
            for i, part in enumerate(target):
                out[part] = tensor[i * vit_hidden : (i + 1) * vit_hidden].clone()
        else:
            out[target] = tensor
    return out
