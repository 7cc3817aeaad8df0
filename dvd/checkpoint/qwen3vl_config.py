"""Reads a Qwen3-VL checkpoint's config.json (dense or MoE) by key name, without remote code.

The keys are those of the real releases (Qwen/Qwen3-VL-*-Instruct, written by transformers
4.57): `vision_config` {depth, hidden_size, intermediate_size, num_heads, out_hidden_size,
patch_size, temporal_patch_size, spatial_merge_size, deepstack_visual_indexes,
num_position_embeddings, ...}, `text_config` (a Qwen3 / Qwen3-MoE LLM whose rope settings
carry the interleaved MRoPE section), the four vision token ids and tie_word_embeddings at
the top level. transformers 5 writes the text rope settings as `rope_parameters`
(rope_theta inside) instead of `rope_scaling` + `rope_theta`: both are read.

Every key that decides a tensor's shape or the prompt's structure is required, and a
missing one is named (no class default is assumed: transformers' defaults are the 8B's
sizes, which would build the wrong model silently). Keys that only tune numerics take
transformers' class defaults, as transformers and vLLM reading the same file would.

Which level decides what (read in transformers 5.19's configuration_qwen3_vl.py and
modeling_qwen3_vl.py, and vLLM 0.32's config/vllm.py `with_hf_config`):
- tie_word_embeddings: the top level (Qwen3VLConfig's own field, default false); both
  transformers and vLLM tie the head by it. The releases also write it in text_config
  (equal); a disagreement is logged and the top level wins.
- mrope_interleaved: transformers' Qwen3-VL always interleaves, vLLM reads the flag
  (default false, which would build Qwen2-VL's sectioned MRoPE): it is required and true.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint.config import read_json_object, require_key, sub_object
from dvd.checkpoint.family import Family, family_of

log = logging.getLogger(__name__)

_VISION_REQUIRED = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "out_hidden_size",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "deepstack_visual_indexes",
    "num_position_embeddings",
)
# transformers' Qwen3VLVisionConfig defaults for the keys that do not change shapes.
VISION_DEFAULTS: dict[str, Any] = {"in_channels": 3, "hidden_act": "gelu_pytorch_tanh"}
_TEXT_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_MOE_TEXT_REQUIRED = ("moe_intermediate_size", "num_experts_per_tok")
_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_CAUSAL_LM = {Family.QWEN3_VL: "Qwen3ForCausalLM", Family.QWEN3_VL_MOE: "Qwen3MoeForCausalLM"}
_TEXT_MODEL_TYPE = {Family.QWEN3_VL: "qwen3", Family.QWEN3_VL_MOE: "qwen3_moe"}


@dataclass(frozen=True)
class Qwen3VLVisionConfig:
    """The vision tower: a ViT on 3-D patches, a 2x2 merger, and DeepStack mergers."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the merger's output width = the LLM's hidden size
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    deepstack_visual_indexes: tuple[int, ...]  # ViT layers whose output DeepStack merges
    num_position_embeddings: int  # a square grid of learned positions, interpolated
    in_channels: int
    hidden_act: str

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision_config.hidden_size {self.hidden_size} is not a multiple of "
                f"vision_config.num_heads {self.num_heads}"
            )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"vision_config.deepstack_visual_indexes {list(self.deepstack_visual_indexes)} "
                f"name layers outside the {self.depth}-layer ViT"
            )
        side = round(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"vision_config.num_position_embeddings {self.num_position_embeddings} is not "
                "a square number (the positions are a square grid)"
            )
        for key in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"vision_config.{key} must be positive")

    @property
    def deepstack_levels(self) -> int:
        return len(self.deepstack_visual_indexes)

    @property
    def feature_width(self) -> int:
        """Width of one row of the tower's output: [main | deepstack_1 | ... | deepstack_k]."""
        return self.out_hidden_size * (1 + self.deepstack_levels)

    @property
    def merge_factor(self) -> int:
        """Pixels per side of one LLM token: patch_size x spatial_merge_size (32)."""
        return self.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class Qwen3VLConfig:
    """What the servers need to know about a Qwen3-VL checkpoint."""

    path: Path
    family: Family  # QWEN3_VL or QWEN3_VL_MOE
    vision: Qwen3VLVisionConfig
    text_config: dict[str, Any]  # as stored
    llm_config: dict[str, Any]  # the text model as a plain Qwen3(-MoE) CausalLM config
    image_token_id: int  # <|image_pad|>
    video_token_id: int  # <|video_pad|>
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool
    mrope_section: tuple[int, int, int]  # rotary pairs given to t, h, w (interleaved)
    rope_theta: float

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_moe(self) -> bool:
        return self.family is Family.QWEN3_VL_MOE

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm_config["hidden_size"])

    @property
    def feature_width(self) -> int:
        """Row width the vision side sends (vLLM's expected image_embeds width)."""
        return self.vision.feature_width

    def tokens_of_grid(self, t: int, h: int, w: int) -> int:
        """LLM tokens of an image or video whose patch grid (grid_thw) is t x h x w."""
        return t * h * w // self.vision.spatial_merge_size**2


def load_qwen3vl_config(path: str | Path) -> Qwen3VLConfig:
    """Reads `path`/config.json; ValueError naming the file and key on anything wrong."""
    folder = Path(path)
    config_file = folder / "config.json"
    raw = read_json_object(config_file)
    family = family_of(raw, str(config_file))
    if family not in _CAUSAL_LM:
        raise ValueError(f"{config_file}: a {family.display_name} checkpoint, not Qwen3-VL")
    vision = _vision(config_file, sub_object(config_file, raw, "vision_config"))
    text = sub_object(config_file, raw, "text_config")
    required = _TEXT_REQUIRED + (_MOE_TEXT_REQUIRED if family is Family.QWEN3_VL_MOE else ())
    for key in required:
        require_key(config_file, text, key, "text_config.")
    experts = text.get("num_experts", text.get("num_local_experts"))
    if family is Family.QWEN3_VL_MOE and experts is None:
        raise ValueError(f"{config_file}: required key 'text_config.num_experts' is missing")
    for key in _TOKEN_KEYS:
        require_key(config_file, raw, key)
    section, theta = _mrope(config_file, text)
    tie = _tie_word_embeddings(config_file, raw, text)
    config = Qwen3VLConfig(
        path=folder,
        family=family,
        vision=vision,
        text_config=text,
        llm_config=_llm_config(family, text, tie),
        image_token_id=int(raw["image_token_id"]),
        video_token_id=int(raw["video_token_id"]),
        vision_start_token_id=int(raw["vision_start_token_id"]),
        vision_end_token_id=int(raw["vision_end_token_id"]),
        tie_word_embeddings=tie,
        mrope_section=section,
        rope_theta=theta,
    )
    _check_consistency(config_file, config)
    return config


def _vision(config_file: Path, raw: dict[str, Any]) -> Qwen3VLVisionConfig:
    for key in _VISION_REQUIRED:
        require_key(config_file, raw, key, "vision_config.")
    merged = {**VISION_DEFAULTS, **raw}
    indexes = merged["deepstack_visual_indexes"]
    if not isinstance(indexes, list) or not all(isinstance(i, int) for i in indexes):
        raise ValueError(
            f"{config_file}: vision_config.deepstack_visual_indexes is not a list of layer "
            f"numbers: {indexes!r}"
        )
    try:
        return Qwen3VLVisionConfig(
            depth=_int(merged, "depth"),
            hidden_size=_int(merged, "hidden_size"),
            intermediate_size=_int(merged, "intermediate_size"),
            num_heads=_int(merged, "num_heads"),
            out_hidden_size=_int(merged, "out_hidden_size"),
            patch_size=_int(merged, "patch_size"),
            temporal_patch_size=_int(merged, "temporal_patch_size"),
            spatial_merge_size=_int(merged, "spatial_merge_size"),
            deepstack_visual_indexes=tuple(indexes),
            num_position_embeddings=_int(merged, "num_position_embeddings"),
            in_channels=_int(merged, "in_channels"),
            hidden_act=str(merged["hidden_act"]),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: {error}") from None


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        value = value[0]  # transformers allows [16, 16] for square patches
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"vision_config.{key} is not an integer: {value!r}")
    return value


def _mrope(config_file: Path, text: dict[str, Any]) -> tuple[tuple[int, int, int], float]:
    """(mrope_section, rope_theta) from rope_scaling + rope_theta (the releases) or
    rope_parameters (transformers 5)."""
    key = "rope_scaling" if isinstance(text.get("rope_scaling"), dict) else "rope_parameters"
    rope = text.get(key)
    if not isinstance(rope, dict):
        raise ValueError(
            f"{config_file}: required key 'text_config.rope_scaling' (or rope_parameters) "
            "with the MRoPE section is missing"
        )
    section = rope.get("mrope_section")
    if not isinstance(section, list) or len(section) != 3:
        raise ValueError(
            f"{config_file}: text_config.{key}.mrope_section is missing or not 3 numbers: "
            f"{section!r}"
        )
    if rope.get("mrope_interleaved") is not True:
        raise ValueError(
            f"{config_file}: text_config.{key}.mrope_interleaved is "
            f"{rope.get('mrope_interleaved')!r}; Qwen3-VL's MRoPE is interleaved (vLLM reads "
            "this flag and would build Qwen2-VL's sectioned MRoPE without it)"
        )
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if not isinstance(theta, (int, float)):
        raise ValueError(f"{config_file}: required key 'text_config.rope_theta' is missing")
    return (int(section[0]), int(section[1]), int(section[2])), float(theta)


def _tie_word_embeddings(config_file: Path, raw: dict[str, Any], text: dict[str, Any]) -> bool:
    top = bool(raw.get("tie_word_embeddings", False))
    if "tie_word_embeddings" in text and bool(text["tie_word_embeddings"]) != top:
        log.info(
            "%s: text_config.tie_word_embeddings=%s is overridden by the top-level "
            "tie_word_embeddings=%s, as in transformers and vLLM",
            config_file,
            text["tie_word_embeddings"],
            top,
        )
    return top


def _llm_config(family: Family, text: dict[str, Any], tie: bool) -> dict[str, Any]:
    """The text model as a plain CausalLM config (what `llm_tensors` checks tensors with).

    Rope settings are left out: they shape no tensor, and a plain Qwen3 config has no
    MRoPE section. MoE: the releases' `num_experts` (transformers 5 names it
    num_local_experts).
    """
    skip = ("model_type", "rope_scaling", "rope_parameters", "rope_theta", "dtype")
    llm = {k: v for k, v in text.items() if k not in skip}
    if family is Family.QWEN3_VL_MOE and "num_experts" not in llm:
        llm["num_experts"] = llm.pop("num_local_experts")
    llm.update(
        architectures=[_CAUSAL_LM[family]],
        model_type=_TEXT_MODEL_TYPE[family],
        tie_word_embeddings=tie,
        torch_dtype=text.get("dtype") or text.get("torch_dtype") or "bfloat16",
    )
    return llm


def _check_consistency(config_file: Path, config: Qwen3VLConfig) -> None:
    text = config.text_config
    if config.vision.out_hidden_size != int(text["hidden_size"]):
        raise ValueError(
            f"{config_file}: vision_config.out_hidden_size {config.vision.out_hidden_size} is "
            f"not text_config.hidden_size {text['hidden_size']} (the merger writes LLM rows)"
        )
    if config.vision.deepstack_levels > int(text["num_hidden_layers"]):
        raise ValueError(
            f"{config_file}: {config.vision.deepstack_levels} DeepStack levels need as many "
            f"LLM layers; text_config.num_hidden_layers is {text['num_hidden_layers']}"
        )
    if sum(config.mrope_section) * 2 != int(text["head_dim"]):
        raise ValueError(
            f"{config_file}: mrope_section {list(config.mrope_section)} does not cover "
            f"text_config.head_dim {text['head_dim']} (its sum must be head_dim / 2)"
        )
    vocab = int(text["vocab_size"])
    for key in _TOKEN_KEYS:
        if not 0 <= getattr(config, key) < vocab:
            raise ValueError(
                f"{config_file}: {key} {getattr(config, key)} is outside text_config.vocab_size "
                f"{vocab}"
            )
