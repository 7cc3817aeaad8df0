"""Qwen3-VL's vision side without servers (issue 13, step 2): preprocessing equals
transformers' processors, the tower's rows equal transformers' Qwen3VLVisionModel (main
and every DeepStack level), items packed into one forward do not see each other, the
batcher cuts by total patches and keeps each item's rows, and the checkpoint's vision
tensors load strictly. All on the qwen3vl-tiny preset in fp32 (bf16 once), a few seconds.

References: images, transformers' `Qwen2VLImageProcessorPil` (what preprocessor_config.json
resolves to without torchvision), run as it is. Video frames, and images with
resize="torch", transformers' own `Qwen3VLVideoProcessor` / `Qwen2VLImageProcessor` code
(smart_resize, grouping, fused normalisation, frame padding, patchify) with the torchvision
calls it makes supplied here: `resize` as torchvision's `resize_image` does it for a uint8
CPU tensor (torch's antialiased bicubic `interpolate`, the call our preprocessing makes too:
that one step is not checked against torchvision itself, which is not installed),
`normalize` ((x - mean) / std), `pil_to_tensor` and `grayscale_to_rgb` (identity on RGB).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from dvd.checkpoint.qwen3vl_verify import VISION_PREFIX
from dvd.checkpoint.weights import CheckpointWeights
from dvd.errors import InvalidInput
from vision_server.qwen3vl.batching import plan_batches
from vision_server.qwen3vl.encoder import EncodedItem, Qwen3VLEncoder, vision_state_dict
from vision_server.qwen3vl.model import Qwen3VLVisionTower
from vision_server.qwen3vl.preprocess import (
    VisionInput,
    patch_timestamps,
    preprocess_image,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
    smart_resize_video,
)
from vision_server.qwen3vl.processor_config import (
    IMAGE_FILE,
    VIDEO_FILE,
    load_image_processor_config,
    load_processor_configs,
    load_video_processor_config,
)

ATOL = 2e-5


@pytest.fixture(scope="module")
def tiny(qwen3vl_tiny_checkpoint: Path) -> Path:
    return qwen3vl_tiny_checkpoint


@pytest.fixture(scope="module")
def config(tiny: Path) -> Qwen3VLConfig:
    return load_qwen3vl_config(tiny)


@pytest.fixture(scope="module")
def encoder(config: Qwen3VLConfig) -> Qwen3VLEncoder:
    return Qwen3VLEncoder(config, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Any:
    """transformers' vision tower of the same checkpoint, fp32."""
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    return model.model.visual.eval()


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise, so resizing has something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy).convert(mode)


def _frames(count: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    return [np.asarray(_image(width, height, seed + i)) for i in range(count)]


def _hf_image_processor(tiny: Path, **kwargs: Any) -> Any:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny, **kwargs)
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    return processor


# --- preprocessing: images ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "grid"),
    [
        (64, 96, (1, 20, 14)),  # under min_pixels (256^2): scaled up, sides ceil'd to 32
        (448, 448, (1, 28, 28)),  # already multiples of 32
        (300, 517, (1, 32, 18)),  # each side rounded to the nearest multiple of 32
        (336, 400, (1, 24, 20)),  # 10.5 and 12.5 x 32: halves round to even (Python's round)
        (1000, 90, (1, 6, 62)),  # wide, over min_pixels: each side to the nearest 32
        (30, 900, (1, 88, 4)),  # tall (aspect 30), under min_pixels: scaled up
    ],
)
def test_images_equal_transformers_pil_processor(
    tiny: Path, width: int, height: int, grid: tuple[int, int, int]
) -> None:
    image = _image(width, height)
    ours = preprocess_image(image, load_image_processor_config(tiny))
    expected = _hf_image_processor(tiny)(images=[image], return_tensors="pt")
    assert ours.grid_thw == grid == tuple(expected["image_grid_thw"][0].tolist())
    assert ours.modality == "image" and ours.timestamps == ()
    assert ours.pixel_values.dtype == torch.float32
    assert torch.equal(ours.pixel_values, expected["pixel_values"])


@pytest.mark.parametrize(
    ("width", "height", "min_pixels", "max_pixels", "grid"),
    [
        (640, 480, 4096, 100_000, (1, 16, 22)),  # over max_pixels: shrunk, sides floor'd
        (1500, 200, 4096, 50_000, (1, 4, 38)),  # over max, wide
        (40, 40, 4096, 100_000, (1, 4, 4)),  # 40 px rounds to 32, min_pixels pushes to 64
        (20, 20, 32 * 32, 100_000, (1, 2, 2)),  # rounds to 0 px, min_pixels makes it 32
    ],
)
def test_overridden_pixel_limits_equal_the_processor_with_that_size(
    tiny: Path,
    width: int,
    height: int,
    min_pixels: int,
    max_pixels: int,
    grid: tuple[int, int, int],
) -> None:
    image = _image(width, height, seed=3)
    config = load_image_processor_config(tiny, min_pixels=min_pixels, max_pixels=max_pixels)
    assert (config.min_pixels, config.max_pixels) == (min_pixels, max_pixels)
    ours = preprocess_image(image, config)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    expected = _hf_image_processor(tiny, size=size)(images=[image], return_tensors="pt")
    assert ours.grid_thw == grid == tuple(expected["image_grid_thw"][0].tolist())
    assert torch.equal(ours.pixel_values, expected["pixel_values"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_converted_as_the_processor_does(tiny: Path, mode: str) -> None:
    image = _image(200, 150, seed=5, mode=mode)
    ours = preprocess_image(image, load_image_processor_config(tiny))
    expected = _hf_image_processor(tiny)(images=[image], return_tensors="pt")
    assert torch.equal(ours.pixel_values, expected["pixel_values"])


def test_smart_resize_rounds_as_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_image_resize,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        smart_resize as hf_video_resize,
    )

    sides = [1, 7, 16, 31, 32, 33, 47, 48, 49, 80, 95, 96, 100, 255, 479, 720, 1080, 3000]
    budgets = [(65536, 16777216), (4096, 100_000), (1024, 1024 * 10), (200_000, 300_000)]
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 200:
                continue
            for low, high in budgets:
                assert smart_resize(h, w, 32, low, high) == hf_image_resize(h, w, 32, low, high)
                for frames in (2, 3, 4, 9):
                    ours = smart_resize_video(frames, h, w, 2, 32, low, high)
                    assert ours == hf_video_resize(frames, h, w, 2, 32, low, high)


def test_unusable_images_are_invalid_input(tiny: Path) -> None:
    config = load_image_processor_config(tiny)
    with pytest.raises(InvalidInput, match="aspect ratio"):
        preprocess_image(_image(2010, 10), config)
    with pytest.raises(InvalidInput, match="at least 2 frames"):
        preprocess_video(_frames(1, 64, 64), [0.0], load_video_processor_config(tiny))
    with pytest.raises(InvalidInput, match="share one size"):
        preprocess_video(
            [*_frames(1, 64, 64), *_frames(1, 64, 32)],
            [0.0, 0.5],
            load_video_processor_config(tiny),
        )
    with pytest.raises(InvalidInput, match="timestamps"):
        preprocess_video(_frames(2, 64, 64), [0.0], load_video_processor_config(tiny))


# --- preprocessing: video ----------------------------------------------------------------


@pytest.fixture
def torchvision_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' torchvision-backed processors run, their torchvision calls supplied
    (see the module docstring)."""
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling

    def resize(
        image: torch.Tensor, size: list[int], interpolation: str, antialias: bool = True
    ) -> torch.Tensor:
        # torchvision.transforms.v2.functional.resize_image, uint8 CPU bicubic branch
        *lead, c, h, w = image.shape
        if (h, w) == tuple(size):
            return image
        assert interpolation == "bicubic" and image.dtype == torch.uint8
        flat = image.reshape(-1, c, h, w)
        out = F.interpolate(flat, size=list(size), mode="bicubic", antialias=antialias)
        return out.reshape(*lead, c, *size)

    def normalize(x: torch.Tensor, mean: Any, std: Any, inplace: bool = False) -> torch.Tensor:
        mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def pil_to_tensor(image: Image.Image) -> torch.Tensor:
        array = np.array(image, copy=True)
        return torch.as_tensor(array).view(image.height, image.width, -1).permute(2, 0, 1)

    modes = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", LANCZOS="lanczos")
    tv = types.SimpleNamespace(
        resize=resize,
        normalize=normalize,
        grayscale_to_rgb=lambda v: v,
        pil_to_tensor=pil_to_tensor,
        InterpolationMode=modes,
    )
    monkeypatch.setattr(backends, "tvF", tv, raising=False)
    monkeypatch.setattr(video_utils, "tvF", tv, raising=False)
    monkeypatch.setattr(
        backends, "pil_torch_interpolation_mapping", {PILImageResampling.BICUBIC: "bicubic"}
    )


def _torchvision_image_processor_class(monkeypatch: pytest.MonkeyPatch) -> Any:
    """transformers' Qwen2VLImageProcessor (it imports torchvision at the top): its file
    executed as a private module, the supplied calls standing in for torchvision's
    functional module; sys.modules is restored after the test."""
    import importlib.util

    import transformers.image_processing_backends as backends
    import transformers.models.qwen2_vl as package

    tv = backends.tvF  # set by the torchvision_calls fixture
    fake_v2 = types.ModuleType("torchvision.transforms.v2")
    fake_v2.functional = tv  # type: ignore[attr-defined]
    for name, module in (
        ("torchvision", types.ModuleType("torchvision")),
        ("torchvision.transforms", types.ModuleType("torchvision.transforms")),
        ("torchvision.transforms.v2", fake_v2),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    file = Path(package.__file__).parent / "image_processing_qwen2_vl.py"
    spec = importlib.util.spec_from_file_location(f"{package.__name__}._torchvision_test", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module.Qwen2VLImageProcessor


def _from_file(cls: Any, file: Path, **kwargs: Any) -> Any:
    raw = json.loads(file.read_text())
    for key in ("video_processor_type", "image_processor_type", "processor_class"):
        raw.pop(key, None)
    return cls(**{**raw, **kwargs})


@pytest.mark.usefixtures("torchvision_calls")
@pytest.mark.parametrize(("width", "height"), [(64, 96), (300, 517), (640, 480), (448, 448)])
def test_torch_resize_equals_transformers_torchvision_image_processor(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, width: int, height: int
) -> None:
    image = _image(width, height, seed=7)
    config = load_image_processor_config(tiny, max_pixels=200_000)
    ours = preprocess_image(image, config, resize="torch")
    size = {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
    processor_class = _torchvision_image_processor_class(monkeypatch)
    processor = _from_file(processor_class, tiny / IMAGE_FILE, size=size)
    expected = processor(images=[image], return_tensors="pt")
    assert ours.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
    pil = preprocess_image(image, config)  # the default differs by about a grey level
    assert (pil.pixel_values - ours.pixel_values).abs().max() <= 3 * 2 / 255


@pytest.fixture
def hf_video_processor(tiny: Path, torchvision_calls: None) -> Any:
    """transformers' Qwen3VLVideoProcessor from the checkpoint's file."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return _from_file(Qwen3VLVideoProcessor, tiny / VIDEO_FILE)


@pytest.mark.parametrize(
    ("frames", "width", "height", "cap", "max_pixels", "grid"),
    [
        (4, 96, 64, False, None, (2, 4, 6)),
        (5, 80, 48, False, None, (3, 4, 4)),  # odd: the last frame fills the last pair
        (4, 50, 20, False, None, (2, 2, 4)),  # a side under 32 px is scaled up first
        (6, 300, 200, False, None, (3, 12, 18)),
        (4, 300, 200, False, 4 * 96 * 96, (2, 4, 6)),  # over max_pixels (all frames)
        (8, 640, 360, True, 60_000, (4, 4, 6)),  # qwen-vl-utils' per-frame cap
    ],
)
def test_video_frames_equal_transformers_video_processor(
    tiny: Path,
    hf_video_processor: Any,
    frames: int,
    width: int,
    height: int,
    cap: bool,
    max_pixels: int | None,
    grid: tuple[int, int, int],
) -> None:
    clip = _frames(frames, width, height, seed=frames)
    config = load_video_processor_config(tiny, max_pixels=max_pixels)
    config = dataclasses.replace(config, cap_pixels_per_frame=cap)
    times = [i * 0.5 for i in range(frames)]
    ours = preprocess_video(clip, times, config)
    size = {"shortest_edge": config.pixels.min_pixels, "longest_edge": config.pixels.max_pixels}
    expected = hf_video_processor(
        videos=[np.stack(clip)],
        do_sample_frames=False,
        cap_pixels_per_frame=cap,
        size=size,
        return_tensors="pt",
    )
    assert ours.grid_thw == grid == tuple(expected["video_grid_thw"][0].tolist())
    assert ours.modality == "video" and len(ours.timestamps) == grid[0]
    assert torch.equal(ours.pixel_values, expected["pixel_values_videos"])


def test_pil_frames_equal_array_frames(tiny: Path) -> None:
    clip = _frames(4, 96, 64)
    config = load_video_processor_config(tiny)
    as_arrays = preprocess_video(clip, [0, 1, 2, 3], config)
    as_pil = preprocess_video([Image.fromarray(f) for f in clip], [0, 1, 2, 3], config)
    assert torch.equal(as_arrays.pixel_values, as_pil.pixel_values)


def test_sampling_and_timestamps_equal_transformers(tiny: Path) -> None:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    config = load_video_processor_config(tiny)
    sampler = types.SimpleNamespace(
        fps=config.fps, min_frames=config.min_frames, max_frames=config.max_frames
    )
    for total, video_fps in [(10, 30.0), (90, 30.0), (301, 29.97), (5000, 24.0), (3, 25.0)]:
        metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
        expected = Qwen3VLVideoProcessor.sample_frames(sampler, metadata)  # type: ignore[arg-type]
        indices = sample_frame_indices(total, video_fps, config)
        assert indices.tolist() == expected.tolist()
        seconds = [i / video_fps for i in indices.tolist()]
        stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, video_fps, 2)  # type: ignore[arg-type]
        assert patch_timestamps(seconds, config.pixels) == pytest.approx(stamps, abs=1e-12)


# --- the tower ---------------------------------------------------------------------------


def test_vision_tensors_load_strictly(tiny: Path, config: Qwen3VLConfig) -> None:
    weights = CheckpointWeights(config)
    state = vision_state_dict(weights)
    stored = {n[len(VISION_PREFIX) :] for n in weights.names() if n.startswith(VISION_PREFIX)}
    assert set(state) == stored
    assert any(name.startswith("deepstack_merger_list.2.") for name in state)
    tower = Qwen3VLVisionTower(config.vision)
    result = tower.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert isinstance(tower.patch_embed.proj, torch.nn.Conv3d)


def _reference_rows(reference: Any, items: list[VisionInput]) -> torch.Tensor:
    pixels = torch.cat([item.pixel_values for item in items])
    grids = torch.tensor([item.grid_thw for item in items])
    with torch.no_grad():
        out = reference(pixels, grid_thw=grids)
    assert len(out.deepstack_features) == 3
    return torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)


def _assert_levels_close(ours: torch.Tensor, expected: torch.Tensor, width: int) -> None:
    """Main block and each DeepStack block compared on their own."""
    assert ours.shape == expected.shape
    for level in range(ours.shape[1] // width):
        block = slice(level * width, (level + 1) * width)
        torch.testing.assert_close(ours[:, block], expected[:, block], atol=ATOL, rtol=1e-4)


def test_one_image_equals_transformers(
    tiny: Path, config: Qwen3VLConfig, encoder: Qwen3VLEncoder, reference: Any
) -> None:
    item = preprocess_image(_image(96, 64), load_image_processor_config(tiny))
    (encoded,) = encoder.encode([item])
    assert encoded.grid_thw == (1, 14, 20)
    assert encoded.features.shape == (70, config.feature_width) == (70, 64 * 4)
    assert encoded.features.dtype == torch.float32 and encoded.features.device.type == "cpu"
    _assert_levels_close(encoded.features, _reference_rows(reference, [item]), 64)


def test_two_images_in_one_forward_equal_transformers_and_each_alone(
    tiny: Path, encoder: Qwen3VLEncoder, reference: Any
) -> None:
    processor = load_image_processor_config(tiny, min_pixels=4096)
    items = [
        preprocess_image(_image(200, 120, 1), processor),
        preprocess_image(_image(64, 160, 2), processor),
    ]
    assert items[0].grid_thw != items[1].grid_thw
    together = encoder.encode_batch(items)
    alone = [encoder.encode_batch([item])[0] for item in items]
    expected = _reference_rows(reference, items)
    _assert_levels_close(torch.cat([e.features for e in together]), expected, 64)
    for joint, single in zip(together, alone, strict=True):
        assert joint.grid_thw == single.grid_thw
        torch.testing.assert_close(joint.features, single.features, atol=1e-5, rtol=1e-5)


def test_a_video_equals_transformers(tiny: Path, encoder: Qwen3VLEncoder, reference: Any) -> None:
    item = preprocess_video(
        _frames(4, 128, 96), [0.0, 0.5, 1.0, 1.5], load_video_processor_config(tiny)
    )
    assert item.grid_thw == (2, 6, 8) and item.timestamps == (0.25, 1.25)
    (encoded,) = encoder.encode([item])
    assert encoded.features.shape[0] == 2 * 6 * 8 // 4
    _assert_levels_close(encoded.features, _reference_rows(reference, [item]), 64)


def test_bf16_runs_close_to_fp32(
    config: Qwen3VLConfig, tiny: Path, encoder: Qwen3VLEncoder
) -> None:
    item = preprocess_image(_image(64, 64), load_image_processor_config(tiny, min_pixels=4096))
    bf16 = Qwen3VLEncoder(config, device="cpu", dtype=torch.bfloat16)
    (low,) = bf16.encode([item])
    (high,) = encoder.encode([item])
    assert low.features.dtype == torch.bfloat16
    torch.testing.assert_close(low.features.float(), high.features, atol=0.1, rtol=0.05)


# --- batching ----------------------------------------------------------------------------


def test_plan_batches_cuts_by_total_patches_in_order() -> None:
    assert plan_batches([], 10) == []
    assert plan_batches([4, 4, 4], 8) == [[0, 1], [2]]
    assert plan_batches([4, 4, 4], 12) == [[0, 1, 2]]
    assert plan_batches([3, 20, 3, 3], 8) == [[0], [1], [2, 3]]  # too big: alone
    assert plan_batches([20], 8) == [[0]]
    with pytest.raises(ValueError, match="max_batch_patches"):
        plan_batches([1], 0)


def test_encode_batches_by_patches_and_returns_each_items_rows(
    tiny: Path, config: Qwen3VLConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor = load_image_processor_config(tiny, min_pixels=4096)
    video = load_video_processor_config(tiny, min_pixels=4096)
    items = [
        preprocess_image(_image(64, 64, 1), processor),  # 16 patches
        preprocess_video(_frames(4, 64, 32), [0, 1, 2, 3], video),  # 16
        preprocess_image(_image(160, 96, 2), processor),  # 60: over the bound, alone
        preprocess_image(_image(96, 64, 3), processor),  # 24
    ]
    assert [item.num_patches for item in items] == [16, 16, 60, 24]
    small = Qwen3VLEncoder(config, device="cpu", dtype=torch.float32, max_batch_patches=40)
    batches: list[list[tuple[int, int, int]]] = []
    real = small.encode_batch

    def spy(batch: list[VisionInput]) -> list[EncodedItem]:
        batches.append([item.grid_thw for item in batch])
        return real(batch)

    monkeypatch.setattr(small, "encode_batch", spy)
    encoded = small.encode(items)
    assert [len(b) for b in batches] == [2, 1, 1]
    assert [e.grid_thw for e in encoded] == [item.grid_thw for item in items]
    for item, out in zip(items, encoded, strict=True):
        (alone,) = real([item])
        assert out.features.shape == (config.tokens_of_grid(*item.grid_thw), config.feature_width)
        torch.testing.assert_close(out.features, alone.features, atol=1e-5, rtol=1e-5)


# --- processor files ---------------------------------------------------------------------


def test_processor_configs_read_the_releases_keys(config: Qwen3VLConfig) -> None:
    image, video = load_processor_configs(config, video_limits=(None, 1_000_000))
    assert (image.patch_size, image.temporal_patch_size, image.merge_size) == (16, 2, 2)
    assert (image.min_pixels, image.max_pixels) == (65536, 16777216)
    assert image.image_mean == image.image_std == (0.5, 0.5, 0.5)
    assert (video.pixels.min_pixels, video.pixels.max_pixels) == (4096, 1_000_000)
    assert (video.fps, video.min_frames, video.max_frames) == (2.0, 4, 768)
    assert image.patch_dim == 1536 and image.factor == 32


def _edited(tiny: Path, tmp_path: Path, file: str, edit: Any) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", IMAGE_FILE, VIDEO_FILE):
        (folder / name).write_text((tiny / name).read_text())
    raw = json.loads((folder / file).read_text())
    edit(raw)
    (folder / file).write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (IMAGE_FILE, lambda raw: raw.pop("image_mean"), "required key 'image_mean'"),
        (IMAGE_FILE, lambda raw: raw.pop("size"), "size.shortest_edge"),
        (VIDEO_FILE, lambda raw: raw.update(patch_size=14), "patch_size 14 disagrees"),
        (IMAGE_FILE, lambda raw: raw.update(do_resize=False), "do_resize False is not supported"),
        (IMAGE_FILE, lambda raw: raw.update(image_std=[0.5, 0.5]), "image_std is not 3"),
    ],
)
def test_a_bad_processor_file_names_the_key(
    tiny: Path, tmp_path: Path, file: str, edit: Any, message: str
) -> None:
    folder = _edited(tiny, tmp_path, file, edit)
    checkpoint = load_qwen3vl_config(folder)
    with pytest.raises(ValueError, match=message) as error:
        load_processor_configs(checkpoint)
    assert file in str(error.value)


def test_qwen2vl_style_min_max_pixels_win_over_size(tiny: Path, tmp_path: Path) -> None:
    folder = _edited(tiny, tmp_path, IMAGE_FILE, lambda raw: raw.update(max_pixels=123456))
    assert load_image_processor_config(folder).max_pixels == 123456
    assert math.isclose(load_image_processor_config(folder).rescale_factor, 1 / 255)
