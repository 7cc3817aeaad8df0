"""Checks, from the safetensors headers alone, that a Qwen3-VL checkpoint's tensors fit its
config.json: the vision tower (patch_embed, pos_embed, blocks, merger, and one
deepstack_merger_list entry per DeepStack level) and the Qwen3 / Qwen3-MoE LLM.

The expected vision tensors are transformers' own: `Qwen3VLVisionModel` built on the meta
device from config.json's vision settings (no memory, no weights), its names under
`model.visual.` as the releases store them (checkpoints that predate transformers 4.52's
`model.` prefix store `visual.`; both are read). The LLM's come from `llm_tensors` (names of
a plain Qwen3ForCausalLM after `names.llm_weight_name`: `model.language_model.*` and
`lm_head.weight`), with the MoE experts fused as the MoE releases store them.
"""

from __future__ import annotations

import logging

from dvd.checkpoint import llm_tensors
from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig
from dvd.checkpoint.verify import Shapes, StoredTensor, compare, stored_llm_tensors
from dvd.checkpoint.weights import CheckpointWeights

log = logging.getLogger(__name__)

VISION_PREFIX = "model.visual."
_VISION_PREFIXES = (VISION_PREFIX, "visual.")


def verify_qwen3vl(config: Qwen3VLConfig, weights: CheckpointWeights | None = None) -> None:
    """Both halves; CheckpointMismatch naming every missing, mis-shaped or (vision) unknown
    tensor and its file."""
    weights = weights or CheckpointWeights(config)
    verify_qwen3vl_vision(config, weights)
    verify_qwen3vl_llm(config, weights)


def expected_vision_tensors(config: Qwen3VLConfig) -> Shapes:
    """Stored name -> shape of every vision-tower tensor, from transformers' model."""
    import torch
    from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

    vision = config.vision
    hf_config = Qwen3VLVisionConfig(
        depth=vision.depth,
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_heads=vision.num_heads,
        out_hidden_size=vision.out_hidden_size,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
        num_position_embeddings=vision.num_position_embeddings,
        in_channels=vision.in_channels,
        hidden_act=vision.hidden_act,
    )
    with torch.device("meta"):
        model = Qwen3VLVisionModel(hf_config)
    return {VISION_PREFIX + name: tuple(t.shape) for name, t in model.state_dict().items()}


def stored_vision_tensors(weights: CheckpointWeights) -> dict[str, StoredTensor]:
    """`model.visual.` name -> the stored vision tensor, in either prefix spelling."""
    shapes = weights.shapes()
    out = {}
    for stored in weights.names():
        for prefix in _VISION_PREFIXES:
            if stored.startswith(prefix):
                name = VISION_PREFIX + stored[len(prefix) :]
                out[name] = StoredTensor(shapes[stored], (stored,), weights.file_of(stored))
                break
    return out


def verify_qwen3vl_vision(config: Qwen3VLConfig, weights: CheckpointWeights) -> None:
    expected = expected_vision_tensors(config)
    stored = stored_vision_tensors(weights)
    hint = f"; {config.vision.deepstack_levels} DeepStack levels at ViT layers " + ", ".join(
        str(i) for i in config.vision.deepstack_visual_indexes
    )
    compare(config.path, "vision", expected, stored, extra_is_error=True, hint=hint)


def expected_llm_tensors(config: Qwen3VLConfig) -> Shapes:
    expected, complete = llm_tensors.expected_llm_tensors(
        config.llm_config, config.tie_word_embeddings
    )
    if not complete:  # cannot happen for qwen3 / qwen3_moe; kept honest if that changes
        raise ValueError(f"{config.path}: no tensor spec for {config.llm_config['model_type']}")
    return llm_tensors.fuse_experts(expected) if config.is_moe else expected


def verify_qwen3vl_llm(config: Qwen3VLConfig, weights: CheckpointWeights) -> None:
    expected = expected_llm_tensors(config)
    stored = stored_llm_tensors(weights)
    tied = config.tie_word_embeddings
    if tied and stored.pop(llm_tensors.HEAD, None) is not None:
        log.warning(
            "%s: tie_word_embeddings is true, so the stored lm_head.weight is not used",
            config.path,
        )
    hint = "" if tied else "; the head is not tied (tie_word_embeddings is false)"
    compare(config.path, "LLM", expected, stored, extra_is_error=False, hint=hint)
