"""Reads a Qwen3-VL checkpoint's preprocessor_config.json / video_preprocessor_config.json.

The keys are those of the releases (Qwen/Qwen3-VL-*-Instruct): `size` {shortest_edge = min
pixels, longest_edge = max pixels}, `patch_size`, `temporal_patch_size`, `merge_size`,
`image_mean`, `image_std`; the video file has the same keys with its own pixel budgets.
Qwen2-VL-era files spell the budgets `min_pixels` / `max_pixels` at the top level; as in
transformers' processors' `__init__`, those win over `size`.

A missing key is an error naming it: transformers' class defaults are Qwen2-VL's (14 px
patches, CLIP mean/std) for images, which would build wrong pixels silently. Switches the
releases leave at their defaults (`do_resize`, `do_rescale`, `do_normalize`,
`do_convert_rgb`, `resample` = bicubic) are accepted only with those values.
`rescale_factor` is read (default 1/255). Video frame sampling keys (`fps`, `min_frames`,
`max_frames`) and the per-frame cap (`cap_pixels_per_frame`, `max_video_tokens`) take
`Qwen3VLVideoProcessor`'s class defaults when absent (transformers 5.19's
video_processing_qwen3_vl.py: 2 fps, 4..768 frames, no cap, 768 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dvd.checkpoint.config import read_json_object
from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, Qwen3VLVisionConfig

IMAGE_FILE = "preprocessor_config.json"
VIDEO_FILE = "video_preprocessor_config.json"
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the processors' `resample`

# Qwen3VLVideoProcessor's class defaults (transformers 5.19).
VIDEO_DEFAULTS: dict[str, Any] = {
    "fps": 2.0,
    "min_frames": 4,
    "max_frames": 768,
    "cap_pixels_per_frame": False,
    "max_video_tokens": 768,
}
_REQUIRED = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
_FIXED = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": PIL_BICUBIC,
}


@dataclass(frozen=True)
class ProcessorConfig:
    """How pixels become patches, for images or for video frames."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int  # size.shortest_edge: the least pixels (all frames together for video)
    max_pixels: int  # size.longest_edge
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels {self.max_pixels} is below min_pixels {self.min_pixels}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std {list(self.image_std)} has a zero")

    @property
    def factor(self) -> int:
        """Pixels per side of one merged token: resized sides are multiples of it (32)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: 3 x temporal_patch_size x patch_size^2 (1536)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def with_limits(self, min_pixels: int | None, max_pixels: int | None) -> ProcessorConfig:
        """This config with the pixel budgets overridden where given."""
        return replace(
            self,
            min_pixels=self.min_pixels if min_pixels is None else min_pixels,
            max_pixels=self.max_pixels if max_pixels is None else max_pixels,
        )

    def check_matches(self, vision: Qwen3VLVisionConfig, where: str) -> None:
        """ValueError if the patch geometry disagrees with config.json's vision_config."""
        pairs = (
            ("patch_size", self.patch_size, vision.patch_size),
            ("temporal_patch_size", self.temporal_patch_size, vision.temporal_patch_size),
            ("merge_size", self.merge_size, vision.spatial_merge_size),
        )
        for key, ours, model in pairs:
            if ours != model:
                raise ValueError(
                    f"{where}: {key} {ours} disagrees with config.json's vision_config ({model})"
                )


@dataclass(frozen=True)
class VideoProcessorConfig:
    """Frame geometry plus the frame-sampling settings of the video processor."""

    pixels: ProcessorConfig
    fps: float  # frames sampled per second of video
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool  # qwen-vl-utils' per-frame pixel cap (off in transformers 5.19)
    max_video_tokens: int  # the cap's tokens per frame

    def with_limits(self, min_pixels: int | None, max_pixels: int | None) -> VideoProcessorConfig:
        return replace(self, pixels=self.pixels.with_limits(min_pixels, max_pixels))


def load_processor_configs(
    config: Qwen3VLConfig,
    image_limits: tuple[int | None, int | None] = (None, None),
    video_limits: tuple[int | None, int | None] = (None, None),
) -> tuple[ProcessorConfig, VideoProcessorConfig]:
    """Both processor files of the checkpoint at config.path, (min, max) pixel budgets
    overridden where given, checked against config.json's patch geometry."""
    image = load_image_processor_config(config.path, *image_limits)
    video = load_video_processor_config(config.path, *video_limits)
    image.check_matches(config.vision, str(config.path / IMAGE_FILE))
    video.pixels.check_matches(config.vision, str(config.path / VIDEO_FILE))
    return image, video


def load_image_processor_config(
    folder: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> ProcessorConfig:
    """`folder`/preprocessor_config.json, budgets overridden where given."""
    file = Path(folder) / IMAGE_FILE
    return _pixels(file, read_json_object(file)).with_limits(min_pixels, max_pixels)


def load_video_processor_config(
    folder: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> VideoProcessorConfig:
    """`folder`/video_preprocessor_config.json, budgets overridden where given."""
    file = Path(folder) / VIDEO_FILE
    raw = read_json_object(file)
    merged = {**VIDEO_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    try:
        config = VideoProcessorConfig(
            pixels=_pixels(file, raw),
            fps=_number(merged, "fps"),
            min_frames=_integer(merged, "min_frames"),
            max_frames=_integer(merged, "max_frames"),
            cap_pixels_per_frame=bool(merged["cap_pixels_per_frame"]),
            max_video_tokens=_integer(merged, "max_video_tokens"),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error}") from None
    if not 0 < config.min_frames <= config.max_frames or config.fps <= 0:
        raise ValueError(
            f"{file}: fps {config.fps}, min_frames {config.min_frames}, max_frames "
            f"{config.max_frames} do not describe a sampling (fps > 0, 0 < min <= max)"
        )
    return config.with_limits(min_pixels, max_pixels)


def _pixels(file: Path, raw: dict[str, Any]) -> ProcessorConfig:
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise ValueError(f"{file}: required key {key!r} is missing")
    for key, value in _FIXED.items():
        if key in raw and raw[key] is not None and raw[key] != value:
            raise ValueError(f"{file}: {key} {raw[key]!r} is not supported (only {value!r})")
    size = raw["size"] if isinstance(raw.get("size"), dict) else {}
    budgets: dict[str, Any] = {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        budgets[key] = raw[key] if raw.get(key) is not None else size.get(edge)
        if budgets[key] is None:
            raise ValueError(f"{file}: required key 'size.{edge}' (or {key}) is missing")
    try:
        return ProcessorConfig(
            patch_size=_integer(raw, "patch_size"),
            temporal_patch_size=_integer(raw, "temporal_patch_size"),
            merge_size=_integer(raw, "merge_size"),
            min_pixels=_integer(budgets, "min_pixels"),
            max_pixels=_integer(budgets, "max_pixels"),
            image_mean=_triple(raw, "image_mean"),
            image_std=_triple(raw, "image_std"),
            rescale_factor=_number({"rescale_factor": 1 / 255, **raw}, "rescale_factor"),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error}") from None


def _integer(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} is not an integer: {value!r}")
    return value


def _number(raw: dict[str, Any], key: str) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is not a number: {value!r}")
    return float(value)


def _triple(raw: dict[str, Any], key: str) -> tuple[float, float, float]:
    value = raw[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"{key} is not 3 numbers (R, G, B): {value!r}")
    a, b, c = (_number({key: v}, key) for v in value)
    return a, b, c
