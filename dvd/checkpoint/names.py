"""Weight names of the two published layouts, and the maps between them. Pure string code.

Original layout (OpenGVLab's InternVLChatModel; vLLM's internvl.py/intern_vit.py load it):
    vision_model.embeddings.{class_embedding, patch_embedding.{weight,bias}, position_embedding}
    vision_model.encoder.layers.{i}.{attn.qkv, attn.proj, attn.q_norm, attn.k_norm, ls1, ls2,
        norm1, norm2, mlp.fc1, mlp.fc2}
    mlp1.{0: LayerNorm, 1: Linear, 3: Linear}   (2 is the GELU)
    language_model.model.*, language_model.lm_head.weight

-HF layout (transformers' InternVLForConditionalGeneration, from its
convert_internvl_weights_to_hf.py; vLLM's interns1.py maps the same prefixes):
    model.vision_tower.embeddings.{cls_token, patch_embeddings.projection, position_embeddings}
    model.vision_tower.encoder.layer.{i}.{attention.{q,k,v}_proj, attention.projection_layer,
        attention.q_norm, attention.k_norm, lambda_1, lambda_2, layernorm_before,
        layernorm_after, mlp.fc1, mlp.fc2}
    model.multi_modal_projector.{layer_norm, linear_1, linear_2}
    model.language_model.*, lm_head.weight
Checkpoints written before transformers 4.52 drop the leading "model." (and keep the LLM as
language_model.model.* / language_model.lm_head.*); both spellings are accepted.
"""

from __future__ import annotations

import re

_HF_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
_HF_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")

# -HF vision-tower suffix -> original suffix (after the "vision_model." prefix).
_HF_TO_ORIGINAL_EMBEDDINGS = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.position_embeddings": "embeddings.position_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
}
_HF_TO_ORIGINAL_LAYER = {
    "attention.projection_layer": "attn.proj",
    "attention.q_norm": "attn.q_norm",
    "attention.k_norm": "attn.k_norm",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TO_ORIGINAL_PROJECTOR = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAMBDA = re.compile(r"encoder\.layer\.(\d+)\.lambda_(\d)$")
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def llm_weight_name(stored_name: str) -> str | None:
    """The name a plain CausalLM (e.g. Qwen3ForCausalLM) gives `stored_name`, or None.

    "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
    "lm_head.weight"; None for vision, projector and anything else that is not the LLM.
    """
    if stored_name.startswith("language_model.model."):
        return "model." + stored_name[len("language_model.model.") :]
    if stored_name.startswith("language_model.lm_head."):
        return "lm_head." + stored_name[len("language_model.lm_head.") :]
    if stored_name.startswith("model.language_model."):
        return "model." + stored_name[len("model.language_model.") :]
    if stored_name.startswith("lm_head."):
        return stored_name
    return None


VIR_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")
"""InternVL3.5-Flash's Visual Resolution Router: the 1/16 projector, pooling and gating."""


def is_original_vision_name(stored_name: str) -> bool:
    """vision_model.*, mlp1.* and, on -Flash checkpoints, the ViR weights."""
    return stored_name.startswith(("vision_model.", "mlp1.", *VIR_PREFIXES))


def is_hf_vision_name(stored_name: str) -> bool:
    return stored_name.startswith(_HF_VISION_PREFIXES + _HF_PROJECTOR_PREFIXES)


def hf_to_original_vision(stored_name: str) -> tuple[str, str | None]:
    """Original name of an -HF vision/projector weight.

    Returns (original_name, part): part is "q", "k" or "v" for the split attention
    projections, which the caller concatenates (in q, k, v order) into attn.qkv.
    ValueError for a name this layout does not define.
    """
    for prefix in _HF_PROJECTOR_PREFIXES:
        if stored_name.startswith(prefix):
            module, _, param = stored_name[len(prefix) :].partition(".")
            if module in _HF_TO_ORIGINAL_PROJECTOR and param in ("weight", "bias"):
                return f"{_HF_TO_ORIGINAL_PROJECTOR[module]}.{param}", None
            raise ValueError(f"unknown -HF projector weight {stored_name!r}")
    for prefix in _HF_VISION_PREFIXES:
        if stored_name.startswith(prefix):
            return _hf_vision_suffix(stored_name, stored_name[len(prefix) :])
    raise ValueError(f"{stored_name!r} is not an -HF vision or projector weight")


def _hf_vision_suffix(stored_name: str, suffix: str) -> tuple[str, str | None]:
    if suffix in _HF_TO_ORIGINAL_EMBEDDINGS:
        return "vision_model." + _HF_TO_ORIGINAL_EMBEDDINGS[suffix], None
    match = _HF_QKV.match(suffix)
    if match:
        layer, part, param = match.groups()
        return f"vision_model.encoder.layers.{layer}.attn.qkv.{param}", part
    match = _HF_LAMBDA.match(suffix)
    if match:
        layer, which = match.groups()
        return f"vision_model.encoder.layers.{layer}.ls{which}", None
    match = _HF_LAYER.match(suffix)
    if match and match.group(2) in _HF_TO_ORIGINAL_LAYER:
        layer, module, param = match.groups()
        return f"vision_model.encoder.layers.{layer}.{_HF_TO_ORIGINAL_LAYER[module]}.{param}", None
    # e.g. vision_tower.layernorm.* (use_mean_pooling=False): the original InternViT has no
    # such weight, so its features would differ; refuse rather than drop it silently.
    raise ValueError(f"unknown -HF vision weight {stored_name!r}")


def original_to_hf(name: str) -> str | list[str]:
    """-HF name(s) of an original-layout weight; attn.qkv maps to the [q, k, v] names.

    Used to write -HF checkpoints from the same random tensors as the original layout.
    """
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model.") :]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model.") :]
    if name.startswith("mlp1."):
        index, _, param = name[len("mlp1.") :].partition(".")
        module = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}[index]
        return f"model.multi_modal_projector.{module}.{param}"
    if not name.startswith("vision_model."):
        raise ValueError(f"{name!r} has no -HF equivalent")
    suffix = name[len("vision_model.") :]
    for hf_suffix, original_suffix in _HF_TO_ORIGINAL_EMBEDDINGS.items():
        if suffix == original_suffix:
            return "model.vision_tower." + hf_suffix
    match = re.match(r"encoder\.layers\.(\d+)\.(.+)$", suffix)
    if not match:
        raise ValueError(f"{name!r} has no -HF equivalent")
    layer, rest = match.groups()
    head = f"model.vision_tower.encoder.layer.{layer}."
    if rest.startswith("attn.qkv."):
        param = rest[len("attn.qkv.") :]
        return [f"{head}attention.{part}_proj.{param}" for part in ("q", "k", "v")]
    if rest in ("ls1", "ls2"):
        return f"{head}lambda_{rest[2]}"
    module, _, param = rest.rpartition(".")
    for hf_module, original_module in _HF_TO_ORIGINAL_LAYER.items():
        if module == original_module:
            return f"{head}{hf_module}.{param}"
    raise ValueError(f"{name!r} has no -HF equivalent")
