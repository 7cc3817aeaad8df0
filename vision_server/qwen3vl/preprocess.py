"""Qwen3-VL preprocessing: an image or a clip of frames -> flattened pixel patches + grid.

This is what transformers 5.19's processors compute (read in
models/qwen2_vl/image_processing_pil_qwen2_vl.py and models/qwen3_vl/
video_processing_qwen3_vl.py), in numpy/torch/PIL only:

1. Size. `smart_resize` rounds each side to a multiple of patch x merge (32 px); if the
   area is over max_pixels both sides shrink by sqrt(area / max) and floor to 32, if under
   min_pixels they grow by sqrt(min / area) and ceil to 32. Video budgets count all frames
   (t x h x w, t rounded to the temporal patch), sides under 32 px are first scaled up, and
   qwen-vl-utils' per-frame cap can be switched on.
2. Pixels. Images, by default: PIL bicubic resize of the RGB image, then x * rescale
   (float64 -> float32) and (x - mean) / std in float32, as the PIL image processor does.
   Video frames (and images with resize="torch", as the torchvision image processor):
   torch's antialiased bicubic resize of the uint8 frames (what torchvision's `resize`
   calls for a uint8 CPU tensor), then the fused (x - mean / rescale) / (std / rescale) in
   float32.
3. Patches. 16 x 16 patches, the 2 x 2 patches of each merge window consecutive
   (windows row-major), each patch spanning `temporal_patch_size` frames: an image is
   repeated over them, a clip's frames are taken in pairs (the last frame repeated to fill
   the final pair). One row per patch of 3 x T x 16 x 16 values, (channel, frame, y, x)
   order; grid_thw = (frames / T, H / 16, W / 16).

A video's time is carried per temporal patch: the mean of its first and last frame's
timestamp (transformers' `Qwen3VLProcessor._calculate_timestamps`, vLLM's twin), which the
prompt writes as `<t seconds>` before each patch's tokens.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dvd.errors import InvalidInput
from vision_server.qwen3vl.processor_config import ProcessorConfig, VideoProcessorConfig

Modality = Literal["image", "video"]
ImageResize = Literal["pil", "torch"]
MAX_ASPECT_RATIO = 200  # the processors refuse longer / shorter images
Frame = Image.Image | np.ndarray


@dataclass(frozen=True)
class VisionInput:
    """One image or video as the tower takes it."""

    pixel_values: torch.Tensor  # (t * h * w, 3 * T * p * p) float32, merge windows consecutive
    grid_thw: tuple[int, int, int]  # temporal patches, patch rows, patch columns
    modality: Modality
    timestamps: tuple[float, ...] = ()  # video: seconds of each temporal patch

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Resized (height, width) of an image: multiples of `factor`, area within the budgets."""
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_grid(data: bytes, processor: ProcessorConfig) -> tuple[int, int] | None:
    """The (grid_h, grid_w) in ViT patches an encoded image will have after smart_resize,
    read from its header without decoding it; None when the header cannot be read or the
    image is refused (each caller picks its own fallback)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
        new_h, new_w = smart_resize(
            height, width, processor.factor, processor.min_pixels, processor.max_pixels
        )
    except Exception:
        return None
    return new_h // processor.patch_size, new_w // processor.patch_size


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> tuple[int, int]:
    """Resized (height, width) of a clip's frames; the budgets count every frame."""
    if num_frames < temporal_factor:
        raise InvalidInput(
            f"a video needs at least {temporal_factor} frames (one temporal patch), "
            f"got {num_frames}"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(
    image: Image.Image, config: ProcessorConfig, resize: ImageResize = "pil"
) -> VisionInput:
    """An image -> its patches and grid (1, h, w).

    `resize` "pil": what Qwen2VLImageProcessorPil computes (transformers' pick when
    torchvision is absent, as on our CPU machines). "torch": what Qwen2VLImageProcessor
    computes, the torchvision processor transformers picks for the releases'
    "Qwen2VLImageProcessorFast" when torchvision is installed (torch's antialiased bicubic
    on the uint8 image, fused normalisation). The two differ by about one grey level.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = _size(image.height, image.width)
    new_h, new_w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    if resize == "torch":
        uint8 = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
        normalized = _torch_pixels(uint8, new_h, new_w, config)
    elif resize == "pil":
        normalized = _pil_pixels(image, new_h, new_w, config).unsqueeze(0)
    else:
        raise ValueError(f"resize {resize!r} is not 'pil' or 'torch'")
    frames = normalized.expand(config.temporal_patch_size, -1, -1, -1)
    patches, grid = patchify(frames, config)
    return VisionInput(patches, grid, "image")


def preprocess_video(
    frames: Sequence[Frame], timestamps: Sequence[float], config: VideoProcessorConfig
) -> VisionInput:
    """Sampled frames (RGB, all one size) and their times in seconds -> patches, grid
    (t, h, w) and one timestamp per temporal patch, as Qwen3VLVideoProcessor does."""
    if len(frames) != len(timestamps):
        raise InvalidInput(f"{len(frames)} video frames but {len(timestamps)} timestamps")
    pixels = config.pixels
    video = _stack_frames(frames)  # (T, 3, H, W) uint8
    num_frames, _, height, width = video.shape
    new_h, new_w = video_frame_size(num_frames, height, width, config)
    normalized = _torch_pixels(video, new_h, new_w, pixels)
    pad = -num_frames % pixels.temporal_patch_size
    if pad:
        normalized = torch.cat([normalized, normalized[-1:].expand(pad, -1, -1, -1)])
    patches, grid = patchify(normalized, pixels)
    return VisionInput(patches, grid, "video", patch_timestamps(timestamps, pixels))


def video_frame_size(
    num_frames: int, height: int, width: int, config: VideoProcessorConfig
) -> tuple[int, int]:
    """Resized (height, width) of a clip of `num_frames` frames of height x width: the
    video budgets over all frames (and qwen-vl-utils' per-frame cap when switched on)."""
    pixels = config.pixels
    max_pixels = pixels.max_pixels
    if config.cap_pixels_per_frame:
        frame_cap = config.max_video_tokens * pixels.factor * pixels.factor
        per_frame = max(
            min(frame_cap, pixels.max_pixels // num_frames), int(pixels.min_pixels * 1.05)
        )
        max_pixels = per_frame * num_frames
    return smart_resize_video(
        num_frames,
        height,
        width,
        pixels.temporal_patch_size,
        pixels.factor,
        pixels.min_pixels,
        max_pixels,
    )


def video_grid(
    num_frames: int, height: int, width: int, config: VideoProcessorConfig
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid `preprocess_video` gives a clip of `num_frames` frames of
    height x width (t: frame pairs, an odd count padded), without touching a pixel."""
    new_h, new_w = video_frame_size(num_frames, height, width, config)
    pixels = config.pixels
    tp = pixels.temporal_patch_size
    return -(-num_frames // tp), new_h // pixels.patch_size, new_w // pixels.patch_size


def patchify(
    frames: torch.Tensor, config: ProcessorConfig
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T', 3, H, W) float frames, T' a multiple of temporal_patch_size -> (patches, grid).

    Row order: temporal patch, merge-window row, merge-window column, row in the window,
    column in the window; values per row: channel, frame in the temporal patch, y, x.
    """
    frame_count, channels, height, width = frames.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_t, grid_h, grid_w = frame_count // tp, height // p, width // p
    view = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> (t, window row, window col, row in window, col in window, channel, frame, y, x)
    ordered = view.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = ordered.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return patches.contiguous(), (grid_t, grid_h, grid_w)


def patch_timestamps(timestamps: Sequence[float], config: ProcessorConfig) -> tuple[float, ...]:
    """Seconds of each temporal patch: the mean of its first and last frame's time (the last
    frame repeated to fill the final patch)."""
    times = [float(t) for t in timestamps]
    tp = config.temporal_patch_size
    times += times[-1:] * (-len(times) % tp)
    return tuple((times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp))


def sample_frame_indices(
    total_frames: int, video_fps: float, config: VideoProcessorConfig
) -> np.ndarray:
    """Which of a video's `total_frames` frames (decoded at `video_fps`) to keep: `fps` per
    second, clamped to min_frames..max_frames and the frames there are, spread evenly
    (Qwen3VLVideoProcessor.sample_frames). Their timestamps are index / video_fps."""
    if total_frames < 1 or video_fps <= 0:
        raise InvalidInput(f"a video of {total_frames} frames at {video_fps} fps has no frames")
    count = int(total_frames / video_fps * config.fps)
    count = min(max(count, config.min_frames), config.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int)


def _pil_pixels(
    image: Image.Image, height: int, width: int, config: ProcessorConfig
) -> torch.Tensor:
    """PIL bicubic resize, x * rescale in float64 -> float32, (x - mean) / std in float32:
    (3, height, width)."""
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = (np.asarray(resized).astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())


def _torch_pixels(
    frames: torch.Tensor, height: int, width: int, config: ProcessorConfig
) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, height, width) float32: antialiased bicubic on the uint8
    frames (torchvision's resize of a uint8 CPU tensor), then (x - mean / rescale) /
    (std / rescale) in float32 (transformers' fused rescale + normalise)."""
    if (height, width) != tuple(frames.shape[-2:]):
        frames = F.interpolate(
            frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
    mean = torch.tensor(config.image_mean, dtype=torch.float32) * (1.0 / config.rescale_factor)
    std = torch.tensor(config.image_std, dtype=torch.float32) * (1.0 / config.rescale_factor)
    return (frames.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def _stack_frames(frames: Sequence[Frame]) -> torch.Tensor:
    """RGB frames as one (T, 3, H, W) uint8 tensor; InvalidInput if sizes or types differ."""
    if not frames:
        raise InvalidInput("a video has no frames")
    arrays: list[np.ndarray] = []
    for index, frame in enumerate(frames):
        if isinstance(frame, Image.Image):
            array = np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB"))
        else:
            array = np.asarray(frame)
            if array.ndim == 2:
                array = np.repeat(array[:, :, None], 3, axis=2)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InvalidInput(
                f"video frame {index} is not an RGB uint8 image (H, W, 3): "
                f"{array.dtype} {array.shape}"
            )
        if arrays and array.shape != arrays[0].shape:
            raise InvalidInput(
                f"video frame {index} is {array.shape[1]}x{array.shape[0]}, frame 0 is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: a clip's frames share one size"
            )
        arrays.append(array)
    _size(arrays[0].shape[0], arrays[0].shape[1])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _size(height: int, width: int) -> tuple[int, int]:
    if height < 1 or width < 1:
        raise InvalidInput(f"an image of {width}x{height} pixels is empty")
    return height, width


def _check_aspect(height: int, width: int) -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidInput(
            f"an image of {width}x{height} has aspect ratio {ratio:.1f}, over "
            f"{MAX_ASPECT_RATIO} (Qwen3-VL's processors refuse it)"
        )
