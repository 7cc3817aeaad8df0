"""The feature wire format: chunking and reassembly are lossless, and bad chunks are refused."""

from __future__ import annotations

import pytest
import torch

from dvd.features import FeatureAssembler, chunk_rows, torch_dtype
from dvd.v1 import common_pb2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("max_chunk_bytes", [1, 1000, 64 * 1024, 10**9])
def test_chunks_reassemble_bit_identically(dtype: torch.dtype, max_chunk_bytes: int) -> None:
    features = torch.randn(3 * 256, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    assembler = FeatureAssembler(features.shape[0], features.shape[1], dtype)
    chunks = list(chunk_rows(features, 0, max_chunk_bytes))
    for chunk in reversed(chunks):  # order must not matter
        assert len(chunk.data) <= max(max_chunk_bytes, 96 * features.element_size())
        assert torch_dtype(chunk.descriptor.dtype) == dtype
        assembler.add(chunk.row_offset, chunk.descriptor, chunk.data)
    assert assembler.complete
    assert torch.equal(assembler.tensor.view(torch.uint8), features.view(torch.uint8))


def test_row_offset_places_chunks() -> None:
    features = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    assembler = FeatureAssembler(8, 4, torch.float32)
    for chunk in chunk_rows(features[4:], 4, 10**6):
        assembler.add(chunk.row_offset, chunk.descriptor, chunk.data)
    assert not assembler.complete
    for chunk in chunk_rows(features[:4], 0, 10**6):
        assembler.add(chunk.row_offset, chunk.descriptor, chunk.data)
    assert torch.equal(assembler.tensor, features)


def _descriptor(
    rows: int, hidden: int, dtype: int = common_pb2.DTYPE_FP32
) -> common_pb2.TensorDescriptor:
    return common_pb2.TensorDescriptor(name="image_features", dtype=dtype, shape=[rows, hidden])


def test_malformed_chunks_are_refused() -> None:
    assembler = FeatureAssembler(4, 2, torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        assembler.add(0, _descriptor(1, 3), b"\0" * 12)
    with pytest.raises(ValueError, match="dtype"):
        assembler.add(0, _descriptor(1, 2, common_pb2.DTYPE_BF16), b"\0" * 4)
    with pytest.raises(ValueError, match="outside"):
        assembler.add(3, _descriptor(2, 2), b"\0" * 16)
    with pytest.raises(ValueError, match="bytes"):
        assembler.add(0, _descriptor(1, 2), b"\0" * 7)
    with pytest.raises(ValueError, match="unknown feature dtype"):
        torch_dtype(99)
