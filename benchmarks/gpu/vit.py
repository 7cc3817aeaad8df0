"""The vision server's model on one device: tiles/s per batch, beside the device's matmul rate.

The model is `vision_server.model.InternVLVision` (ViT + pixel shuffle + mlp1), built from
an in-code config with random weights (drawn on the device: a 6B model in seconds), in
inference mode, in the given dtype. A batch's time is the best of its timed repeats after
warm-up, with the device synchronised around each.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.gpu.shapes import VitShape


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int, min_time_s: float = 0.0) -> float:
    """Best seconds of one `fn()` call over at least `repeats` calls (and `min_time_s`)."""
    best = float("inf")
    spent, done = 0.0, 0
    while done < repeats or spent < min_time_s:
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - started
        best, spent, done = min(best, elapsed), spent + elapsed, done + 1
        if done >= 50:
            break
    return best


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """The device's dense matmul rate: best of `repeats` [size x size] @ [size x size]."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(3):
            torch.matmul(a, b)
        seconds = timed(lambda: torch.matmul(a, b), device, repeats)
    return 2 * size**3 / seconds / 1e12


def build_model(shape: VitShape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """InternVLVision with random weights (std 0.02, LayerScale 0.1) on `device` in `dtype`."""
    from vision_server.model import InternVLVision

    with torch.device(device):
        model = InternVLVision(shape.internvl_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ls1", "ls2")):
                parameter.fill_(0.1)  # keeps 45 layers of random weights finite in bf16
            elif parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02)
    return model.to(dtype=dtype).eval()


@dataclass(frozen=True)
class BatchRate:
    shape: str
    batch: int
    ms_per_batch: float
    tiles_per_s: float
    tflops: float
    """Achieved FLOP rate (the shape's FLOPs per tile x tiles/s)."""
    fraction_of_matmul: float | None
    """tflops / the matmul rate measured in the same run."""
    feature_gib_per_s: float
    """bf16 feature bytes produced per second at this rate (what a transport must carry)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_batch(
    model: torch.nn.Module,
    shape: VitShape,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    matmul: float | None,
    repeats: int,
    min_time_s: float,
) -> BatchRate:
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        out = model(pixels)
        if tuple(out.shape) != (batch, shape.tokens_out, shape.llm_hidden):
            raise RuntimeError(f"{shape.name}: output {tuple(out.shape)} has the wrong shape")
        model(pixels)  # second warm-up: kernels chosen, caches allocated
        seconds = timed(lambda: model(pixels), device, repeats, min_time_s)
    tiles_per_s = batch / seconds
    tflops = shape.flops_per_tile() * tiles_per_s / 1e12
    return BatchRate(
        shape=shape.name,
        batch=batch,
        ms_per_batch=seconds * 1000.0,
        tiles_per_s=tiles_per_s,
        tflops=tflops,
        fraction_of_matmul=tflops / matmul if matmul else None,
        feature_gib_per_s=shape.feature_bytes(1) * tiles_per_s / 2**30,
    )
