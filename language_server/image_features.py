"""Where the language server gets image features from: a vision server or itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class EncodedImages:
    """Features of a request's images, in order, and how long each stage took (ns)."""

    features: list[torch.Tensor]  # one [rows, hidden] tensor per image
    preprocess_ns: int = 0
    queue_ns: int = 0
    encode_ns: int = 0
    transfer_ns: int = 0
    server: str = field(default="")


class FeatureSource(Protocol):
    """Turns a request's images into features."""

    async def encode(self, request_id: str, images: list[bytes]) -> EncodedImages: ...

    async def healthy(self) -> list[tuple[str, bool]]: ...

    async def close(self) -> None: ...
