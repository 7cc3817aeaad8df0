"""Writes a random-weight Qwen3-VL checkpoint with the file layout of a real release.

transformers' own `Qwen3VLForConditionalGeneration`, built from a `Qwen3VLConfig` with the
preset's sizes, takes seeded random tensors (drawn here, for every tensor the model has, in
name order) and writes the safetensors with `save_pretrained`: so the tensor names, which
tensors exist (a tied head is no lm_head tensor) and their shapes are transformers' own.

transformers 5 then writes config.json in its own dialect (`rope_parameters` instead of the
releases' `rope_scaling` + `rope_theta`, vision model_type "qwen3_vl_vision"), so config.json
and generation_config.json are rewritten with exactly the keys of the real releases (read
from Qwen/Qwen3-VL-4B-Instruct's config.json, written by transformers 4.57.0.dev0), holding
the same values; a test reads them back through transformers and compares. The processor
and tokenizer files are the releases' too (`qwen3vl_tokenizer.py`).

Files, as in Qwen/Qwen3-VL-2B-Instruct (the one-shard release): config.json,
generation_config.json, model.safetensors, preprocessor_config.json,
video_preprocessor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json,
vocab.json, merges.txt. (Larger releases shard the weights and add
model.safetensors.index.json.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvd.checkpoint.qwen3vl_presets import Qwen3VLPreset
from dvd.checkpoint.qwen3vl_tokenizer import Qwen3VLTokenIds, write_qwen3vl_tokenizer_files
from dvd.checkpoint.tokenizer import REGULAR_VOCAB, write_json

if TYPE_CHECKING:
    import torch

# The transformers version the real releases name in config.json (nothing reads it).
RELEASE_TRANSFORMERS_VERSION = "4.57.0.dev0"
ROPE_THETA = 5_000_000
# preprocessor_config.json / video_preprocessor_config.json of the releases: pixel budgets
# (size.shortest_edge = min pixels, size.longest_edge = max pixels) and normalisation.
IMAGE_MIN_PIXELS = 65_536  # 256 x 256
IMAGE_MAX_PIXELS = 16_777_216  # 4096 x 4096
VIDEO_MIN_PIXELS = 4_096
VIDEO_MAX_PIXELS = 25_165_824
QWEN3VL_MEAN = [0.5, 0.5, 0.5]
QWEN3VL_STD = [0.5, 0.5, 0.5]
# Qwen3-VL-*-Instruct generation_config.json sampling settings.
INSTRUCT_SAMPLING = {
    "do_sample": True,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
}


def write_qwen3vl(out: Path, preset: Qwen3VLPreset, seed: int) -> None:
    """Writes every file of the checkpoint into the (empty) folder `out`."""
    import torch
    import transformers

    ids = write_qwen3vl_tokenizer_files(out, preset.llm_max_position_embeddings)
    config = qwen3vl_config(preset, ids)
    model_class = getattr(transformers, _architecture(preset))
    with torch.device("meta"):
        model = model_class(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if preset.tie_word_embeddings:
        del shapes["lm_head.weight"]  # the embedding table, saved once
    state = random_state(shapes, preset, ids, seed)
    model.load_state_dict(
        {name: t.to(torch.bfloat16) for name, t in state.items()}, strict=False, assign=True
    )
    if preset.tie_word_embeddings:
        model.tie_weights()
    if preset.is_moe:
        # Written exactly as given: transformers' own reversal would keep its in-memory
        # orientation (see `release_experts`).
        model.save_pretrained(
            out, state_dict=release_experts(model.state_dict()), save_original_format=False
        )
    else:
        model.save_pretrained(out)
    write_json(out / "config.json", release_config(preset, ids))
    write_json(out / "generation_config.json", generation_config(ids))
    write_json(out / "preprocessor_config.json", preprocessor_config(preset))
    write_json(out / "video_preprocessor_config.json", video_preprocessor_config(preset))


def _architecture(preset: Qwen3VLPreset) -> str:
    """transformers' class (and config.json's architecture) of the preset's family."""
    if preset.is_moe:
        return "Qwen3VLMoeForConditionalGeneration"
    return "Qwen3VLForConditionalGeneration"


def qwen3vl_config(preset: Qwen3VLPreset, ids: Qwen3VLTokenIds) -> Any:
    """transformers' Qwen3VLConfig (Qwen3VLMoeConfig) for the preset (the model is built
    from it)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    config_class = Qwen3VLMoeConfig if preset.is_moe else Qwen3VLConfig
    return config_class.from_dict(release_config(preset, ids))


def _moe_text_keys(preset: Qwen3VLPreset) -> dict[str, Any]:
    """text_config's MoE keys as Qwen3-VL-30B-A3B-Instruct's config.json has them (written by
    transformers 4.57's Qwen3VLMoeTextConfig): every layer sparse, top-k renormalised.
    transformers 5.19's config class has no `norm_topk_prob` field (its router always
    renormalises) but keeps the key; vLLM's Qwen3-MoE block reads it (`renormalize`)."""
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": preset.moe_intermediate_size,
        "norm_topk_prob": True,
        "num_experts": preset.num_experts,
        "num_experts_per_tok": preset.num_experts_per_tok,
    }


def release_config(preset: Qwen3VLPreset, ids: Qwen3VLTokenIds) -> dict[str, Any]:
    """config.json with the real releases' keys (and nesting), the preset's sizes."""
    family = "qwen3_vl_moe" if preset.is_moe else "qwen3_vl"
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids.endoftext,
        "dtype": "bfloat16",
        "eos_token_id": ids.im_end,
        "head_dim": preset.llm_head_dim,
        "hidden_act": "silu",
        "hidden_size": preset.llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": preset.llm_intermediate,
        "max_position_embeddings": preset.llm_max_position_embeddings,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": preset.llm_heads,
        "num_hidden_layers": preset.llm_layers,
        "num_key_value_heads": preset.llm_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "mrope_interleaved": True,
            "mrope_section": list(preset.mrope_section),
            "rope_type": "default",
        },
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": ids.padded_vocab(),
    }
    if preset.is_moe:
        text = dict(sorted({**text, **_moe_text_keys(preset)}.items()))
        text["model_type"] = "qwen3_vl_moe_text"
    vision = {
        "deepstack_visual_indexes": list(preset.deepstack_visual_indexes),
        "depth": preset.vit_depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": preset.vit_hidden,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": preset.vit_intermediate,
        # The releases say "qwen3_vl" ("qwen3_vl_moe") here; transformers reads it as
        # qwen3_vl_vision (qwen3_vl_moe_vision).
        "model_type": family,
        "num_heads": preset.vit_heads,
        "num_position_embeddings": preset.num_position_embeddings,
        "out_hidden_size": preset.llm_hidden,
        "patch_size": preset.patch_size,
        "spatial_merge_size": preset.spatial_merge_size,
        "temporal_patch_size": preset.temporal_patch_size,
    }
    return {
        "architectures": [_architecture(preset)],
        "image_token_id": ids.image_pad,
        "model_type": family,
        "text_config": text,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "transformers_version": RELEASE_TRANSFORMERS_VERSION,
        "video_token_id": ids.video_pad,
        "vision_config": vision,
        "vision_end_token_id": ids.vision_end,
        "vision_start_token_id": ids.vision_start,
    }


def release_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the fused experts as the MoE releases store them: gate_up_proj (E,
    hidden, 2 x moe_inter) and down_proj (E, moe_inter, hidden), the transpose of how
    transformers 5.19 holds them. vLLM loads that orientation (is_fused_checkpoint_transposed)
    and transformers' loader transposes it back (conversion_mapping "qwen3_vl_moe",
    Transpose(1, 2, check_dims=True)); but on save that reversal compares each tensor with
    the model's own shape, finds them equal and never transposes, so save_pretrained alone
    would write the in-memory orientation, which vLLM mis-reads."""
    return {
        name: t.transpose(1, 2).contiguous() if ".mlp.experts." in name else t
        for name, t in state.items()
    }


def generation_config(ids: Qwen3VLTokenIds) -> dict[str, Any]:
    """generation_config.json of the Instruct releases: a turn ends at <|im_end|> (or
    <|endoftext|>), and their recommended sampling."""
    return {
        "bos_token_id": ids.endoftext,
        "eos_token_id": [ids.im_end, ids.endoftext],
        "pad_token_id": ids.endoftext,
        **INSTRUCT_SAMPLING,
        "transformers_version": "4.56.0",
    }


def preprocessor_config(preset: Qwen3VLPreset) -> dict[str, Any]:
    """preprocessor_config.json: Qwen2-VL's image processor with Qwen3-VL's 16 px patches."""
    return {
        "image_mean": QWEN3VL_MEAN,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": QWEN3VL_STD,
        "merge_size": preset.spatial_merge_size,
        "patch_size": preset.patch_size,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": IMAGE_MAX_PIXELS, "shortest_edge": IMAGE_MIN_PIXELS},
        "temporal_patch_size": preset.temporal_patch_size,
    }


def video_preprocessor_config(preset: Qwen3VLPreset) -> dict[str, Any]:
    """video_preprocessor_config.json (frame sampling: the class defaults, 2 fps, 4..768)."""
    return {
        "image_mean": QWEN3VL_MEAN,
        "image_std": QWEN3VL_STD,
        "merge_size": preset.spatial_merge_size,
        "patch_size": preset.patch_size,
        "processor_class": "Qwen3VLProcessor",
        "size": {"longest_edge": VIDEO_MAX_PIXELS, "shortest_edge": VIDEO_MIN_PIXELS},
        "temporal_patch_size": preset.temporal_patch_size,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }


def random_state(
    shapes: dict[str, tuple[int, ...]], preset: Qwen3VLPreset, ids: Qwen3VLTokenIds, seed: int
) -> dict[str, torch.Tensor]:
    """Seeded float32 tensors for every name in `shapes`, drawn in name order.

    Scales keep activations O(1): matrices ~ 1/sqrt(fan_in), norms ~ 1, biases ~ 0.02,
    learned positions ~ 0.5. The embedding table and head have std 1, so the tiny LLM's
    logits are peaked; head rows of the added tokens other than <|im_end|> are zero (with a
    tied head, except the tokens prompts contain), as for the InternVL presets, so greedy
    decoding stays in the decodable vocabulary.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(*shape, generator=generator)
        if name.endswith("bias"):
            state[name] = noise * 0.02
        elif len(shape) == 1:  # LayerNorm / RMSNorm weights
            state[name] = 1.0 + noise * 0.02
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[name] = noise
        elif name.endswith("pos_embed.weight"):
            state[name] = noise * 0.5
        elif ".mlp.experts." in name:  # (experts, out, in) as transformers holds them
            state[name] = noise / math.sqrt(shape[-1])
        else:  # linear layers and the patch embedding's Conv3d: fan_in = all but dim 0
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
    head = "model.language_model.embed_tokens.weight"
    keep = {ids.im_end}
    if preset.tie_word_embeddings:
        keep |= {ids.im_start, ids.vision_start, ids.vision_end}
    else:
        head = "lm_head.weight"
    vocab = ids.padded_vocab()
    state[head][[i for i in range(REGULAR_VOCAB, vocab) if i not in keep]] = 0.0
    return state
