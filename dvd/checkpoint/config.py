"""Reads an InternVL3.5 checkpoint's config.json (either published layout) without remote code.

Original layout (`InternVLChatModel`, model_type `internvl_chat`): the keys of OpenGVLab's
`InternVLChatConfig` / `InternVisionConfig`. Their writer dumps every key, so a missing key
falls back to the class default, as the remote code would.

-HF layout (`InternVLForConditionalGeneration`, model_type `internvl`): the keys of
transformers' `InternVLConfig` / `InternVLVisionConfig`. transformers saves configs as a diff
against the class defaults, so a real -HF config.json may omit e.g. `hidden_size: 1024`;
the defaults below are those classes' defaults (a test compares them with transformers).
The tiling knobs of this layout live in preprocessor_config.json (GotOcr2 image processor).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint.family import ARCHITECTURES, Family

log = logging.getLogger(__name__)

ORIGINAL = "original"
HF = "hf"
_ARCHITECTURES = {"InternVLChatModel": ORIGINAL, "InternVLForConditionalGeneration": HF}

# OpenGVLab's InternVisionConfig defaults (configuration_intern_vit.py). The size keys have
# InternViT-6B defaults there, which would silently build the wrong model: they are required.
_ORIGINAL_VISION_DEFAULTS: dict[str, Any] = {
    "layer_norm_eps": 1e-6,
    "norm_type": "rms_norm",
    "qkv_bias": False,
    "qk_normalization": True,
    "hidden_act": "gelu",
    "num_channels": 3,
}
_ORIGINAL_VISION_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
)
# OpenGVLab's InternVLChatConfig.__init__ defaults.
_ORIGINAL_TOP_DEFAULTS: dict[str, Any] = {
    "select_layer": -1,
    "force_image_size": None,
    "downsample_ratio": 0.5,
    "template": None,
    "use_thumbnail": False,
    "ps_version": "v1",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
}
# transformers' InternVLVisionConfig defaults (InternViT-300M-448px).
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "layer_norm_eps": 1e-6,
    "norm_type": "layer_norm",
    "attention_bias": False,
    "use_qk_norm": False,
    "hidden_act": "gelu",
    "num_channels": 3,
}
# transformers' InternVLConfig defaults.
HF_TOP_DEFAULTS: dict[str, Any] = {
    "downsample_ratio": 0.5,
    "vision_feature_layer": -1,
    "image_token_id": 151667,
}
# GotOcr2ImageProcessor defaults: InternVL's tiling is crop_to_patches with a thumbnail.
_HF_PREPROCESSOR_DEFAULTS: dict[str, Any] = {"min_patches": 1, "max_patches": 12}

# The CausalLM class a text model_type maps to, for -HF configs whose text_config has no
# "architectures" (transformers does not need it there).
_CAUSAL_LM = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
_MODEL_TYPE_OF_CAUSAL_LM = {causal_lm: model_type for model_type, causal_lm in _CAUSAL_LM.items()}


@dataclass(frozen=True)
class VisionConfig:
    """InternViT hyper-parameters, in the original layout's terms for both layouts."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    norm_type: str  # "layer_norm" | "rms_norm"
    qkv_bias: bool
    qk_normalization: bool
    hidden_act: str
    num_channels: int

    def __post_init__(self) -> None:
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm_type {self.norm_type!r} is not layer_norm|rms_norm")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size")


@dataclass(frozen=True)
class FlashConfig:
    """InternVL3.5-Flash's Visual Resolution Router (ViR) settings from config.json.

    `flash_mode` switches the router on; a tile is compressed to 1/16 when its router
    probability is above the `relative_threshold` quantile of the request's tiles and at
    least `absolute_threshold`.
    """

    enabled: bool
    relative_threshold: float
    absolute_threshold: float

    def __post_init__(self) -> None:
        if not 0 <= self.relative_threshold <= 1:
            raise ValueError(f"flash_relative_threshold {self.relative_threshold} not in [0, 1]")
        if not 0 <= self.absolute_threshold <= 1:
            raise ValueError(f"flash_absolute_threshold {self.absolute_threshold} not in [0, 1]")


@dataclass(frozen=True)
class InternVLConfig:
    """What the servers need to know about a checkpoint, whichever layout it is stored in."""

    path: Path
    layout: str  # "original" | "hf"
    vision: VisionConfig
    llm_config: dict[str, Any]
    downsample_ratio: float
    ps_version: str
    select_layer: int
    template: str | None
    min_dynamic_patch: int
    max_dynamic_patch: int
    use_thumbnail: bool
    image_size: int
    img_start_token: str = "<img>"
    img_end_token: str = "</img>"
    img_context_token: str = "<IMG_CONTEXT>"
    flash: FlashConfig | None = None  # set on -Flash checkpoints (they carry the ViR weights)

    def __post_init__(self) -> None:
        if self.layout not in (ORIGINAL, HF):
            raise ValueError(f"layout {self.layout!r} is not {ORIGINAL}|{HF}")
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version {self.ps_version!r} is not v1|v2")
        if not 0 < self.downsample_ratio <= 1:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is not in (0, 1]")
        if self.min_dynamic_patch < 1 or self.max_dynamic_patch < self.min_dynamic_patch:
            raise ValueError(
                f"min_dynamic_patch {self.min_dynamic_patch} / max_dynamic_patch "
                f"{self.max_dynamic_patch} are not 1 <= min <= max"
            )

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LLM's head is its embedding table (resolved per layout at load)."""
        return bool(self.llm_config["tie_word_embeddings"])

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm_config["hidden_size"])

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per image tile after pixel shuffle (256 for 448 px / 14 px / 0.5)."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_router(self) -> bool:
        """Whether the checkpoint carries ViR (mlp2, pooling and gating weights)."""
        return self.flash is not None

    @property
    def compressed_tokens_per_tile(self) -> int:
        """LLM tokens of a tile that ViR compresses to 1/16 (64 for 448 px / 14 px)."""
        return self.tokens_per_tile // 4


def load_config(path: str | Path) -> InternVLConfig:
    """Reads `path`/config.json; ValueError naming the file and key on anything wrong."""
    folder = Path(path)
    config_file = folder / "config.json"
    raw = read_json_object(config_file)
    architectures = raw.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ValueError(f"{config_file}: key 'architectures' is missing or empty")
    if ARCHITECTURES.get(architectures[0]) in (Family.QWEN3_VL, Family.QWEN3_VL_MOE):
        raise ValueError(
            f"{config_file}: architecture {architectures[0]!r} is Qwen3-VL, not InternVL: "
            "dvd.checkpoint.qwen3vl_config.load_qwen3vl_config reads it (serving it is not "
            "implemented yet; see dvd.checkpoint.family)"
        )
    layout = _ARCHITECTURES.get(architectures[0])
    if layout is None:
        raise ValueError(
            f"{config_file}: architecture {architectures[0]!r} is not one of "
            f"{sorted(_ARCHITECTURES)}"
        )
    if layout == ORIGINAL:
        return _load_original(folder, config_file, raw)
    return _load_hf(folder, config_file, raw)


def _load_original(folder: Path, config_file: Path, raw: dict[str, Any]) -> InternVLConfig:
    vision_raw = sub_object(config_file, raw, "vision_config")
    for key in _ORIGINAL_VISION_REQUIRED:
        require_key(config_file, vision_raw, key, "vision_config.")
    vision_raw = {**_ORIGINAL_VISION_DEFAULTS, **vision_raw}
    vision = _vision(config_file, vision_raw, qkv_bias="qkv_bias", qk_norm="qk_normalization")
    llm = _llm_config(config_file, raw, "llm_config")
    top = {**_ORIGINAL_TOP_DEFAULTS, **raw}
    image_size = top["force_image_size"] or vision.image_size
    return InternVLConfig(
        path=folder,
        layout=ORIGINAL,
        vision=vision,
        llm_config=llm,
        downsample_ratio=_number(config_file, top, "downsample_ratio"),
        ps_version=str(top["ps_version"]),
        select_layer=int(top["select_layer"]),
        template=top["template"],
        min_dynamic_patch=int(top["min_dynamic_patch"]),
        max_dynamic_patch=int(top["max_dynamic_patch"]),
        use_thumbnail=bool(top["use_thumbnail"]),
        image_size=int(image_size),
        flash=_flash(config_file, raw),
    )


def _flash(config_file: Path, raw: dict[str, Any]) -> FlashConfig | None:
    """-Flash checkpoints have a `flash_mode` key and the router's two thresholds.

    With flash_mode off the router is still usable on request when the thresholds are
    there; without them it is not (None).
    """
    if raw.get("flash_mode") is None:
        return None
    keys = ("flash_relative_threshold", "flash_absolute_threshold")
    enabled = bool(raw["flash_mode"])
    if not enabled and any(key not in raw for key in keys):
        return None
    for key in keys:
        require_key(config_file, raw, key)
    return FlashConfig(enabled, *(_number(config_file, raw, key) for key in keys))


def _load_hf(folder: Path, config_file: Path, raw: dict[str, Any]) -> InternVLConfig:
    vision_raw = {**HF_VISION_DEFAULTS, **sub_object(config_file, raw, "vision_config")}
    vision_raw["image_size"] = _square(config_file, vision_raw, "image_size")
    vision_raw["patch_size"] = _square(config_file, vision_raw, "patch_size")
    vision = _vision(config_file, vision_raw, qkv_bias="attention_bias", qk_norm="use_qk_norm")
    llm = _llm_config(config_file, raw, "text_config")
    top = {**HF_TOP_DEFAULTS, **raw}
    tiling = dict(_HF_PREPROCESSOR_DEFAULTS)
    preprocessor_file = folder / "preprocessor_config.json"
    if preprocessor_file.exists():
        tiling.update(read_json_object(preprocessor_file))
    return InternVLConfig(
        path=folder,
        layout=HF,
        vision=vision,
        llm_config=llm,
        downsample_ratio=_number(config_file, top, "downsample_ratio"),
        # transformers' InternVLModel.pixel_shuffle swaps height and width back, which is
        # what the original code calls pixel shuffle "v2"; -HF has no v1.
        ps_version="v2",
        select_layer=int(top["vision_feature_layer"]),
        template=None,
        min_dynamic_patch=int(tiling["min_patches"]),
        max_dynamic_patch=int(tiling["max_patches"]),
        # GotOcr2's crop_to_patches always adds a thumbnail when it makes more than one tile.
        use_thumbnail=True,
        image_size=vision.image_size,
    )


def _vision(config_file: Path, raw: dict[str, Any], *, qkv_bias: str, qk_norm: str) -> VisionConfig:
    try:
        return VisionConfig(
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            image_size=int(raw["image_size"]),
            patch_size=int(raw["patch_size"]),
            layer_norm_eps=float(raw["layer_norm_eps"]),
            norm_type=str(raw["norm_type"]),
            qkv_bias=bool(raw[qkv_bias]),
            qk_normalization=bool(raw[qk_norm]),
            hidden_act=str(raw["hidden_act"]),
            num_channels=int(raw["num_channels"]),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: vision_config: {error}") from None


def _llm_config(config_file: Path, raw: dict[str, Any], key: str) -> dict[str, Any]:
    """The LLM's config as a plain CausalLM config dict (architectures and torch_dtype set)."""
    llm = dict(sub_object(config_file, raw, key))
    if key == "text_config":
        # transformers' InternVLConfig defaults a text_config without model_type to qwen2.
        llm.setdefault("model_type", "qwen2")
    architectures = llm.get("architectures") or [None]
    llm.setdefault("model_type", _MODEL_TYPE_OF_CAUSAL_LM.get(architectures[0]))
    model_type = llm.get("model_type")
    if not llm.get("architectures"):
        if model_type not in _CAUSAL_LM:
            raise ValueError(f"{config_file}: {key}.architectures is missing")
        llm["architectures"] = [_CAUSAL_LM[model_type]]
    require_key(config_file, llm, "model_type", f"{key}.")
    llm["tie_word_embeddings"] = _tie_word_embeddings(config_file, raw, key, llm)
    dtype = llm.get("torch_dtype") or llm.get("dtype") or raw.get("torch_dtype") or raw.get("dtype")
    llm["torch_dtype"] = dtype or "bfloat16"
    for needed in ("hidden_size", "vocab_size", "num_hidden_layers"):
        require_key(config_file, llm, needed, f"{key}.")
    return llm


def _tie_word_embeddings(
    config_file: Path, raw: dict[str, Any], key: str, llm: dict[str, Any]
) -> bool:
    """Whether the LM head is the embedding table, decided as each layout's own code does.

    -HF (transformers' InternVLForConditionalGeneration): the model ties by its top-level
    config, InternVLConfig.tie_word_embeddings, which defaults to true, and never reads the
    text_config's flag. transformers 5 writes both, and a tied head as no lm_head tensor.
    Original (OpenGVLab's InternVLChatConfig): `self.tie_word_embeddings =
    self.llm_config.tie_word_embeddings` overwrites the top-level key, and the LLM ties by
    its own config; a missing key takes the LLM class's default (false for Qwen2/3, Llama).
    """
    if key == "text_config":
        top = raw.get("tie_word_embeddings", True)
        if "tie_word_embeddings" in llm and bool(llm["tie_word_embeddings"]) != bool(top):
            log.info(
                "%s: text_config.tie_word_embeddings=%s is overridden by the top-level "
                "tie_word_embeddings=%s, as in transformers",
                config_file,
                llm["tie_word_embeddings"],
                top,
            )
        return bool(top)
    if "tie_word_embeddings" in llm:
        return bool(llm["tie_word_embeddings"])
    from dvd.checkpoint.llm_tensors import resolve_text_config

    return bool(resolve_text_config(llm).tie_word_embeddings)


def read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; ValueError naming the file if it is missing or not one."""
    if not file.is_file():
        raise ValueError(f"{file}: no such file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: top level is not a JSON object")
    return data


def sub_object(config_file: Path, raw: dict[str, Any], key: str) -> dict[str, Any]:
    """`raw[key]`, which must be a JSON object (ValueError naming the file and key)."""
    require_key(config_file, raw, key)
    value = raw[key]
    if not isinstance(value, dict):
        raise ValueError(f"{config_file}: key {key!r} is not an object")
    return value


def require_key(config_file: Path, raw: dict[str, Any], key: str, prefix: str = "") -> None:
    """ValueError naming the file and key when `raw` lacks `key` (or it is null)."""
    if raw.get(key) is None:
        raise ValueError(f"{config_file}: required key '{prefix}{key}' is missing")


def _number(config_file: Path, raw: dict[str, Any], key: str) -> float:
    value = raw.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{config_file}: key {key!r} is not a number: {value!r}")
    return float(value)


def _square(config_file: Path, raw: dict[str, Any], key: str) -> int:
    """-HF stores sizes as [h, w]; InternVL tiles are square."""
    value = raw[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{config_file}: vision_config.{key} {value} is not square")
        return int(value[0])
    return int(value)
