"""Where the language server gets image features from: a vision server or itself.

An item to encode is an image's file bytes or (Qwen3-VL) a whole video as one `VideoClip`;
InternVL sends a video's frames as images instead (video_prompt.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from dvd.deadline import Deadline
from dvd.vir_mode import VirMode


@dataclass(frozen=True)
class VideoClip:
    """A video encoded as ONE item (Qwen3-VL): its sampled frames, each an encoded image
    file, and each frame's time in seconds."""

    frames: tuple[bytes, ...]
    timestamps_s: tuple[float, ...]


VisualItem = bytes | VideoClip
"""What a feature source encodes: an image's file bytes, or a whole video."""


@dataclass
class EncodedImages:
    """Features of a request's images, in order, and how long each stage took (ns)."""

    features: list[torch.Tensor]  # one [rows, hidden] tensor per image
    tokens_per_tile: list[list[int]] = field(default_factory=list)  # per image
    grids: list[tuple[int, ...]] = field(default_factory=list)  # Qwen3-VL: grid_thw per image
    content_keys: list[str] = field(default_factory=list)  # Qwen3-VL: per image
    timestamps: list[tuple[float, ...]] = field(default_factory=list)
    """Qwen3-VL: per item, a video's seconds per temporal patch (empty for an image)."""
    preprocess_ns: int = 0
    queue_ns: int = 0
    encode_ns: int = 0
    transfer_ns: int = 0
    server: str = field(default="")
    release: Callable[[], None] = field(default=lambda: None)
    """Frees the transport memory the features may view; call once they have been copied."""


class FeatureSource(Protocol):
    """Turns a request's images into features."""

    async def encode(
        self,
        request_id: str,
        images: Sequence[VisualItem],
        mode: VirMode | None = None,
        deadline: Deadline = Deadline(),
        max_tiles: Sequence[int] = (),
    ) -> EncodedImages:
        """`images`: the items in prompt order (VideoClips only for a family that encodes a
        video as one item, Qwen3-VL; others refuse them with InvalidInput). mode None: the
        source's default (the vision server's, or --vir-mode in coupled); the encode ends by
        `deadline` (DvdError DEADLINE_EXCEEDED otherwise). `max_tiles` bounds each image's
        tiles (0 or left out: the source's own bound; 1 for video frames)."""
        ...

    async def start(self) -> None:
        """Connects (resolves the vision servers' names); before serving."""
        ...

    def member_addresses(self) -> list[str]:
        """The vision servers new requests may go to now."""
        ...

    async def healthy(self) -> list[tuple[str, bool]]:
        """(vision server, serving) for each one requests may go to."""
        ...

    async def close(self) -> None: ...
