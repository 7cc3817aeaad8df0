"""Regions of a buffer handed out first fit and coalesced when freed (shm arenas, RDMA
receive buffers). Lengths are rounded up to whole pages, so regions never share a page."""

from __future__ import annotations

import bisect
import threading

ALIGNMENT = 4096


def aligned(length: int) -> int:
    """`length` rounded up to whole pages, at least one."""
    return max(ALIGNMENT, (length + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT)


class FirstFit:
    def __init__(self, size: int) -> None:
        self.size = size
        self.allocated = 0
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, disjoint
        self._lock = threading.Lock()

    def allocate(self, length: int) -> int | None:
        """Offset of a free region of at least `length` bytes, or None when none is."""
        length = aligned(length)
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= length:
                    if free == length:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + length, free - length)
                    self.allocated += length
                    return offset
        return None

    def allocate_all(self, lengths: list[int]) -> list[int] | None:
        """A region for each length, or none at all (None) when they do not all fit."""
        offsets: list[int] = []
        for length in lengths:
            offset = self.allocate(length)
            if offset is None:
                for taken, size in zip(offsets, lengths, strict=False):
                    self.free(taken, size)
                return None
            offsets.append(offset)
        return offsets

    def free(self, offset: int, length: int) -> None:
        length = aligned(length)
        with self._lock:
            i = bisect.bisect(self._free, (offset, 0))
            self._free.insert(i, (offset, length))
            self.allocated -= length
            if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
                self._free[i] = (offset, length + self._free.pop(i + 1)[1])
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
                del self._free[i]
