"""The shm transport: arena allocation, in-place writes, bounds, and cleanup after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvd.features import wire_dtype
from dvd.transport import receiver_class, sender_class
from dvd.transport.base import RequestShape
from dvd.transport.shm_arena import ALIGNMENT, Arena, MappedArena, remove_stale_arenas
from dvd.v1 import vision_pb2


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    """Arenas live in /dev/shm in production; tests use a private folder for the allocator
    tests and the real /dev/shm where a vision server must find them."""
    return tmp_path


def test_arena_allocates_first_fit_and_coalesces(shm_dir: Path) -> None:
    arena = Arena(8 * ALIGNMENT, directory=shm_dir)
    try:
        a = arena.allocate(ALIGNMENT)
        b = arena.allocate(3 * ALIGNMENT)
        c = arena.allocate(4 * ALIGNMENT)
        assert (a, b, c) == (0, ALIGNMENT, 4 * ALIGNMENT)
        assert arena.allocate(1) is None  # full
        arena.free(b, 3 * ALIGNMENT)
        arena.free(a, ALIGNMENT)  # coalesces with b's hole into one of 4 pages
        assert arena.allocate(4 * ALIGNMENT) == 0
        arena.free(0, 4 * ALIGNMENT)
        arena.free(c, 4 * ALIGNMENT)
        assert arena.allocate(8 * ALIGNMENT) == 0 and arena.allocated == 8 * ALIGNMENT
    finally:
        arena.close()
    assert not list(shm_dir.iterdir())


def test_stale_arenas_of_dead_owners_are_removed(shm_dir: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = shm_dir / f"dvd-arena-{dead.stdout.strip()}-abcdef01"
    stale.write_bytes(b"\0" * 16)
    alive = shm_dir / f"dvd-arena-{os.getpid()}-abcdef02"
    alive.write_bytes(b"\0" * 16)
    unrelated = shm_dir / "somebody-else"
    unrelated.write_bytes(b"x")
    assert remove_stale_arenas(shm_dir) == [stale.name]
    assert alive.exists() and unrelated.exists()


def test_writers_only_map_dvd_arenas(shm_dir: Path) -> None:
    for name in ("../etc/passwd", "psm_123", "dvd-arena-1-zz/../x"):
        with pytest.raises(ValueError, match="not a dvd shared-memory arena"):
            MappedArena(name, 4096, directory=shm_dir)


def _shape(images: int, capacity: int, hidden: int = 64) -> RequestShape:
    return RequestShape("r1", [capacity] * images, hidden, torch.bfloat16)


def _plan(index: int, rows: int, hidden: int = 64) -> vision_pb2.ImagePlan:
    return vision_pb2.ImagePlan(
        image_index=index,
        num_tiles=rows // 256,
        tokens_per_tile=[256] * (rows // 256),
        hidden_size=hidden,
    )


def test_features_land_in_place_bit_identical_and_regions_are_freed() -> None:
    receiver = receiver_class("shm")(arena_bytes=8 * 2**20)
    sender = sender_class("shm")()
    try:
        features = [torch.randn(rows, 64).to(torch.bfloat16) for rows in (3 * 256, 256)]
        reception = receiver.open(_shape(2, 13 * 256 * 64 * 2))
        request = vision_pb2.EncodeRequest(
            images=[vision_pb2.ImageInput()] * 2, destination=reception.destination
        )
        emission = sender.open(request)
        for index, rows in enumerate(features):
            reception.on_plan(_plan(index, rows.shape[0]))
            # two pieces, the second first: order does not matter
            half = rows.shape[0] // 2
            for first, part in ((half, rows[half:]), (0, rows[:half])):
                for chunk in emission.chunks(index, first, part, 10**9):
                    assert not chunk.data and chunk.written.length == part.numel() * 2
                    reception.on_chunk(chunk)
        received = reception.features()
        for got, sent in zip(received, features, strict=True):
            assert torch.equal(got.view(torch.int16), sent.view(torch.int16))
        allocated = receiver.arena.allocated  # type: ignore[attr-defined]
        reception.release()
        reception.release()  # idempotent
        assert receiver.arena.allocated == allocated - 2 * 13 * 256 * 64 * 2  # type: ignore[attr-defined]
    finally:
        sender.close()
        receiver.close()


def test_bounds_are_checked_on_both_sides() -> None:
    receiver = receiver_class("shm")(arena_bytes=4 * 2**20)
    sender = sender_class("shm")()
    try:
        reception = receiver.open(_shape(1, 256 * 64 * 2))
        destination = reception.destination
        request = vision_pb2.EncodeRequest(
            images=[vision_pb2.ImageInput()], destination=destination
        )
        emission = sender.open(request)
        too_many = torch.zeros(512, 64, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="overflow"):
            list(emission.chunks(0, 0, too_many, 10**9))
        outside = vision_pb2.EncodeRequest()
        outside.CopyFrom(request)
        outside.destination.shm.image_offsets[0] = destination.shm.arena_bytes
        with pytest.raises(ValueError, match="outside the arena"):
            sender.open(outside)
        reception.on_plan(_plan(0, 256))
        forged = vision_pb2.FeatureChunk(
            image_index=0,
            row_offset=0,
            descriptor={
                "name": "image_features",
                "dtype": wire_dtype(torch.bfloat16),
                "shape": [256, 64],
            },
            written=vision_pb2.RegionWrite(offset=0 + 4096, length=256 * 64 * 2),
        )
        with pytest.raises(ValueError, match="outside its rows"):
            reception.on_chunk(forged)
        with pytest.raises(ValueError, match="incomplete"):
            reception.features()
        reception.release()
    finally:
        sender.close()
        receiver.close()


def test_a_full_arena_falls_back_to_the_grpc_stream() -> None:
    receiver = receiver_class("shm")(arena_bytes=2**20)
    try:
        held = receiver.open(_shape(1, 2**20))
        assert held.destination is not None
        fallback = receiver.open(_shape(1, 2**20))
        assert fallback.destination is None  # bytes will travel in the stream
        held.release()
        assert receiver.open(_shape(1, 2**20)).destination is not None
    finally:
        receiver.close()


def test_an_arena_owner_killed_with_sigkill_is_cleaned_up_by_the_next_owner() -> None:
    script = (
        "import time; from dvd.transport.shm_arena import Arena; a = Arena(1 << 20); "
        "print(a.name, flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        name = owner.stdout.readline().strip()
        assert (Path("/dev/shm") / name).exists()
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert (Path("/dev/shm") / name).exists()  # nobody could unlink it
        successor = Arena(1 << 20)  # a restarted language server
        try:
            assert not (Path("/dev/shm") / name).exists()
        finally:
            successor.close()
        assert not (Path("/dev/shm") / successor.name).exists()
    finally:
        owner.kill()
        owner.wait()
