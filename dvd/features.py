"""The feature wire format: a descriptor (name, dtype, shape) plus raw row-major bytes.

Features never travel pickled. A tensor of shape [rows, hidden] is cut into chunks of whole
rows, each at most `max_chunk_bytes`, and reassembled on the receiving side into one
preallocated tensor per image, so the only copy on arrival is the one into that tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dvd.v1 import common_pb2

FEATURES_NAME = "image_features"

_TORCH_DTYPES: dict[int, torch.dtype] = {
    common_pb2.DTYPE_BF16: torch.bfloat16,
    common_pb2.DTYPE_FP16: torch.float16,
    common_pb2.DTYPE_FP32: torch.float32,
}
_WIRE_DTYPES: dict[torch.dtype, common_pb2.DType] = {
    torch.bfloat16: common_pb2.DTYPE_BF16,
    torch.float16: common_pb2.DTYPE_FP16,
    torch.float32: common_pb2.DTYPE_FP32,
}
_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def torch_dtype(wire_dtype: int) -> torch.dtype:
    """Maps a wire DType (UNSPECIFIED meaning BF16) to a torch dtype."""
    if wire_dtype == common_pb2.DTYPE_UNSPECIFIED:
        return torch.bfloat16
    try:
        return _TORCH_DTYPES[wire_dtype]
    except KeyError:
        raise ValueError(f"unknown feature dtype {wire_dtype}") from None


def wire_dtype(dtype: torch.dtype) -> common_pb2.DType:
    try:
        return _WIRE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel as features") from None


def parse_dtype(name: str) -> torch.dtype:
    """Parses a dtype flag value ("bfloat16", "fp32", ...)."""
    try:
        return _NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(_NAMES)}") from None


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of a CPU tensor (bf16 goes through an int16 view)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


@dataclass(frozen=True)
class Chunk:
    row_offset: int
    descriptor: common_pb2.TensorDescriptor
    data: bytes


def chunk_rows(features: torch.Tensor, row_offset: int, max_chunk_bytes: int) -> Iterator[Chunk]:
    """Cuts a [rows, hidden] tensor into chunks of whole rows of at most max_chunk_bytes."""
    rows, hidden = features.shape
    row_bytes = hidden * features.element_size()
    rows_per_chunk = max(1, max_chunk_bytes // row_bytes)
    dtype = wire_dtype(features.dtype)
    for start in range(0, rows, rows_per_chunk):
        part = features[start : start + rows_per_chunk]
        descriptor = common_pb2.TensorDescriptor(
            name=FEATURES_NAME, dtype=dtype, shape=[part.shape[0], hidden]
        )
        yield Chunk(row_offset + start, descriptor, tensor_bytes(part))


class FeatureAssembler:
    """Receives the chunks of one image's features into a preallocated [rows, hidden] tensor."""

    def __init__(self, rows: int, hidden: int, dtype: torch.dtype) -> None:
        self.tensor = torch.empty((rows, hidden), dtype=dtype)
        self._filled = 0

    @property
    def complete(self) -> bool:
        return self._filled == self.tensor.shape[0]

    def add(self, row_offset: int, descriptor: common_pb2.TensorDescriptor, data: bytes) -> None:
        rows_total, hidden = self.tensor.shape
        if len(descriptor.shape) != 2 or descriptor.shape[1] != hidden:
            raise ValueError(f"chunk shape {list(descriptor.shape)} does not fit [*, {hidden}]")
        if torch_dtype(descriptor.dtype) != self.tensor.dtype:
            raise ValueError(f"chunk dtype {descriptor.dtype} differs from {self.tensor.dtype}")
        rows = descriptor.shape[0]
        if row_offset < 0 or row_offset + rows > rows_total:
            raise ValueError(
                f"chunk rows {row_offset}..{row_offset + rows} outside 0..{rows_total}"
            )
        if len(data) != rows * hidden * self.tensor.element_size():
            raise ValueError(f"chunk has {len(data)} bytes, descriptor says {rows}x{hidden}")
        # One copy: numpy views the destination rows as bytes and reads `data` in place.
        target = self.tensor[row_offset : row_offset + rows].reshape(-1).view(torch.uint8)
        target.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        self._filled += rows
