"""A shared-memory arena: one file in /dev/shm, owned by the language server, cut into regions.

The owner creates `/dev/shm/dvd-arena-<pid>-<random>` and maps it; vision servers on the same
host map it by name and write features straight into the regions they are given. Regions
are handed out first-fit from a free list and coalesced when freed.

Nothing may outlive its owner: the file is unlinked on close, and because a SIGKILL leaves
no chance to do that, every owner removes, when it starts, the arenas whose owner pid is
no longer alive. The pid in the name is the only state needed for that.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from pathlib import Path

from dvd.transport.first_fit import ALIGNMENT, FirstFit

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "dvd-arena-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_arenas(directory: Path = SHM_DIR) -> list[str]:
    """Unlinks arenas whose owner process is gone; returns their names."""
    removed = []
    for path in directory.glob(PREFIX + "*"):
        match = _NAME.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("removed %d stale shared-memory arena(s): %s", len(removed), ", ".join(removed))
    return removed


def valid_arena_name(name: str) -> bool:
    """Only our own file names: no path separators, no other files in /dev/shm."""
    return bool(_NAME.match(name))


class Arena:
    """The owner's side: creates the file, allocates regions, unlinks on close."""

    def __init__(self, size: int, directory: Path = SHM_DIR) -> None:
        if size < ALIGNMENT:
            raise ValueError(f"shared-memory arena of {size} bytes is too small")
        remove_stale_arenas(directory)
        self.size = (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = directory / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self.buffer = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._regions = FirstFit(self.size)
        log.info("shared-memory arena %s: %.0f MiB", self.path, self.size / 2**20)

    @property
    def allocated(self) -> int:
        return self._regions.allocated

    def allocate(self, length: int) -> int | None:
        """Offset of a region of at least `length` bytes, or None when none is free."""
        return self._regions.allocate(length)

    def allocate_all(self, lengths: list[int]) -> list[int] | None:
        return self._regions.allocate_all(lengths)

    def free(self, offset: int, length: int) -> None:
        self._regions.free(offset, length)

    def view(self, offset: int, length: int) -> memoryview:
        return memoryview(self.buffer)[offset : offset + length]

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.buffer.close()
        except BufferError:  # a tensor still views it; the mapping goes with the process
            log.debug("arena %s still in use at close", self.name)


class MappedArena:
    """A writer's view of someone else's arena, mapped by name."""

    def __init__(self, name: str, size: int, directory: Path = SHM_DIR) -> None:
        if not valid_arena_name(name):
            raise ValueError(f"{name!r} is not a dvd shared-memory arena name")
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ValueError(f"cannot open shared-memory arena {name}: {exc.strerror}") from None
        try:
            stat = os.fstat(fd)
            if stat.st_size != size:
                raise ValueError(f"arena {name} has {stat.st_size} bytes, the request says {size}")
            self.buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.path = path
        self.inode = stat.st_ino

    def is_current(self) -> bool:
        """False once the owner unlinked (or replaced) the file: the mapping then only
        keeps dead memory alive and must be dropped."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.buffer.close()
        except BufferError:
            log.debug("arena %s still in use at close", self.name)
