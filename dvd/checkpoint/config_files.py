"""The JSON files of a checkpoint other than the tokenizer's, with the real releases' keys.

Sizes come from the preset; every other value is InternVL3.5's (OpenGVLab/InternVL3_5-*
for the original layout, OpenGVLab/InternVL3_5-*-HF for the -HF one).
"""

from __future__ import annotations

from typing import Any

from dvd.checkpoint.presets import Preset
from dvd.checkpoint.tokenizer import TokenIds

# The transformers release the real InternVL3.5 checkpoints were written with is not known
# exactly; this is the version field only, nothing reads it.
TRANSFORMERS_VERSION = "4.55.0"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def llm_config(preset: Preset, ids: TokenIds) -> dict[str, Any]:
    """A Qwen3ForCausalLM (or Qwen2ForCausalLM) config dict (llm_config / text_config)."""
    config = _qwen3_llm_config(preset, ids)
    if preset.llm_model_type == "qwen2":
        # Qwen2's head_dim is hidden_size / heads, and its biases are not configurable.
        for key in ("attention_bias", "head_dim"):
            del config[key]
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    return config


def _qwen3_llm_config(preset: Preset, ids: TokenIds) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "head_dim": preset.llm_head_dim,
        "hidden_act": "silu",
        "hidden_size": preset.llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": preset.llm_intermediate,
        "max_position_embeddings": preset.llm_max_position_embeddings,
        "max_window_layers": preset.llm_layers,
        "model_type": "qwen3",
        "num_attention_heads": preset.llm_heads,
        "num_hidden_layers": preset.llm_layers,
        "num_key_value_heads": preset.llm_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": ids.padded_vocab(),
    }


def original_config(preset: Preset, ids: TokenIds) -> dict[str, Any]:
    """config.json of the original (InternVLChatModel) layout (-Flash keys when it has ViR)."""
    config = _original_config(preset, ids)
    if preset.flash_thresholds is not None:
        relative, absolute = preset.flash_thresholds
        config["flash_mode"] = True
        config["flash_relative_threshold"] = relative
        config["flash_absolute_threshold"] = absolute
    return dict(sorted(config.items()))


def _original_config(preset: Preset, ids: TokenIds) -> dict[str, Any]:
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": preset.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": preset.image_size,
        "image_fold": None,
        "llm_config": llm_config(preset, ids),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "system_message": None,
        "template": "internvl2_5",
        "tie_word_embeddings": preset.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": preset.vit_hidden,
            "image_size": preset.image_size,
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "intermediate_size": preset.vit_intermediate,
            "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_6b",
            "norm_type": preset.vit_norm_type,
            "num_attention_heads": preset.vit_heads,
            "num_channels": 3,
            "num_hidden_layers": preset.vit_layers,
            "patch_size": preset.patch_size,
            "qk_normalization": preset.vit_qk_normalization,
            "qkv_bias": preset.vit_qkv_bias,
            "torch_dtype": "bfloat16",
            "use_flash_attn": True,
        },
    }


def original_generation_config() -> dict[str, Any]:
    """generation_config.json of the original releases: no token ids (69 bytes). (The -HF
    one, with Qwen's bos/eos, is written by transformers: hf_writer.py.)"""
    return {"_from_model_config": True, "transformers_version": TRANSFORMERS_VERSION}


def hf_preprocessor_config(preset: Preset) -> dict[str, Any]:
    """preprocessor_config.json of -HF: GotOcr2's dynamic tiling = InternVL's 1..12 tiles."""
    return {
        "crop_to_patches": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": IMAGENET_MEAN,
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "image_std": IMAGENET_STD,
        "max_patches": 12,
        "min_patches": 1,
        "processor_class": "InternVLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": preset.image_size, "width": preset.image_size},
    }


def hf_processor_config(preset: Preset) -> dict[str, Any]:
    return {"image_seq_length": preset.tokens_per_tile, "processor_class": "InternVLProcessor"}


def safetensors_index(weight_names: list[str], total_size: int, file: str) -> dict[str, Any]:
    """model.safetensors.index.json: every name in one file (real releases shard by size)."""
    return {
        "metadata": {"total_size": total_size},
        "weight_map": {name: file for name in sorted(weight_names)},
    }
