"""Writes the -HF layout the way the real -HF releases were made: with transformers.

transformers' own `InternVLForConditionalGeneration`, built from an `InternVLConfig`, takes
the random tensors and writes config.json, the safetensors and generation_config.json with
`save_pretrained`. So the tensor names, which tensors exist (a tied head is written as no
lm_head tensor at all), and the config keys and their nesting are transformers' own, not
our idea of them. The tokenizer and image-processor files come from `make.py` (the fast
image processor the real preprocessor_config.json names needs torchvision, which the CPU
install lacks).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvd.checkpoint.presets import Preset
from dvd.checkpoint.tokenizer import TokenIds

if TYPE_CHECKING:
    import torch

# config_files.llm_config keys that are ours to write, not the config class's arguments.
_NOT_CONFIG_ARGUMENTS = ("architectures", "torch_dtype")


def save_with_transformers(
    out: Path, preset: Preset, ids: TokenIds, llm: dict[str, Any], state: dict[str, torch.Tensor]
) -> None:
    """Saves `state` (-HF names, as `random_weights.to_hf` gives them) with transformers."""
    import torch
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    config = internvl_config(preset, ids, llm)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    expected = set(model.state_dict())
    if preset.tie_word_embeddings:
        expected.discard("lm_head.weight")  # the same tensor as the embedding table
    if set(state) != expected:
        raise ValueError(
            f"random weights do not fit transformers' model: missing "
            f"{sorted(expected - set(state))[:5]}, extra {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if preset.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=ids.bos, eos_token_id=ids.eos)
    model.save_pretrained(out)


def internvl_config(preset: Preset, ids: TokenIds, llm: dict[str, Any]) -> Any:
    """transformers' InternVLConfig with InternVL3.5's values and the preset's sizes."""
    from transformers import CONFIG_MAPPING, InternVLConfig, InternVLVisionConfig

    # The head's tying is left to the top level, where transformers reads it (default true);
    # the text config keeps its class default (false for Qwen2/3), as a text config built
    # on its own has: the disagreement real -HF configs show.
    skip = (*_NOT_CONFIG_ARGUMENTS, "tie_word_embeddings")
    text = CONFIG_MAPPING[llm["model_type"]](**{k: v for k, v in llm.items() if k not in skip})
    top: dict[str, Any] = {} if preset.tie_word_embeddings else {"tie_word_embeddings": False}
    vision = InternVLVisionConfig(
        hidden_size=preset.vit_hidden,
        num_hidden_layers=preset.vit_layers,
        num_attention_heads=preset.vit_heads,
        intermediate_size=preset.vit_intermediate,
        image_size=[preset.image_size, preset.image_size],
        patch_size=[preset.patch_size, preset.patch_size],
        norm_type=preset.vit_norm_type,
        attention_bias=preset.vit_qkv_bias,
        use_qk_norm=preset.vit_qk_normalization,
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids.img_context,
        image_seq_length=preset.tokens_per_tile,
        downsample_ratio=preset.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        **top,
    )
    config.dtype = "bfloat16"
    return config
