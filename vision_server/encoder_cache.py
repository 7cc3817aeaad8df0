"""An LRU cache of encoded images, keyed by the image's content, bounded in bytes.

Repeated images (a system prompt's logo, a document asked about several times, retries)
skip decode, tiling and the ViT. The key is a hash of the image bytes and of everything
else that changes the features (the tile limit); the value is every tile's features and
the tiling layout, so a hit streams exactly what a miss would have.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from vision_server.tile_features import TileFeatures
from vision_server.tiling import ImageLayout


@dataclass(frozen=True)
class CachedImage:
    layout: ImageLayout
    features: TileFeatures

    @property
    def nbytes(self) -> int:
        tensors = [
            self.features.quarter,
            self.features.sixteenth,
            self.features.compress_probability,
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def image_key(data: bytes, max_tiles: int) -> str:
    return f"{hashlib.blake2b(data, digest_size=16).hexdigest()}:{max_tiles}"


class EncoderCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("encoder cache capacity must not be negative")
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, with_vir: bool) -> CachedImage | None:
        """The entry, if it has what the request needs (ViR outputs when with_vir)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (with_vir and entry.features.compress_probability is None):
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: CachedImage) -> None:
        size = entry.nbytes
        if size > self.capacity_bytes:
            return  # larger than the whole cache: never worth evicting everything
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = entry
            self.bytes += size
            while self.bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)
