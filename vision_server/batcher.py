"""Packs tiles from concurrent requests into ViT batches.

Requests submit runs of tiles; one worker task takes runs in arrival order until a batch
holds its capacity or `max_wait_ms` has passed since its first tile arrived, splitting a run
that does not fit. The capacity is `max_batch_tiles`, or fewer tiles where that many would
take longer than `max_batch_ms` (see batch_sizer): first come, first finished. The ViT
runs on a single dedicated thread, so the event loop keeps streaming the previous batch's
features while the next batch encodes.
Results go back to each request's own queue as soon as its batch is done.

The queue is bounded in tiles (`max_queued_tiles`, 0: unbounded). A call is admitted as a
whole before any of its images is tiled (`admit`, with tile counts read from the image
headers), so a call is either refused at once or never: room is reserved for its tiles
while they are being tiled, so calls tiled side by side cannot overshoot the bound together.
A call whose tiles would take the queue past the bound is refused, unless no other call has
tiles admitted, so that a call larger than the bound still runs on an idle server. A call
that ends early (its deadline passed, its caller left, it failed) withdraws its tiles still
queued, so they are neither encoded nor counted against the bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from vision_server.batch_sizer import BatchSizer
from vision_server.tile_features import TileFeatures

log = logging.getLogger(__name__)


class Cancellation:
    """Shared by every run of a request, so runs split off later see it too."""

    cancelled = False


@dataclass
class TileRun:
    """Consecutive tiles of one image of one request."""

    request_id: str
    image_index: int
    first_tile: int
    pixel_values: torch.Tensor  # [tiles, 3, S, S]
    sink: asyncio.Queue[EncodedTiles | BaseException]
    with_vir: bool = False  # also compute ViR's 1/16 features and router probabilities
    enqueued_ns: int = field(default_factory=time.monotonic_ns)
    cancellation: Cancellation = field(default_factory=Cancellation)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    def split(self, tiles: int) -> tuple[TileRun, TileRun]:
        """The first `tiles` tiles and the rest; both keep the request's sink and cancellation."""
        head = replace(self, pixel_values=self.pixel_values[:tiles])
        tail = replace(
            self, first_tile=self.first_tile + tiles, pixel_values=self.pixel_values[tiles:]
        )
        return head, tail


@dataclass(frozen=True)
class EncodedTiles:
    """Features of a run of tiles, with how long they queued and encoded."""

    image_index: int
    first_tile: int
    features: TileFeatures
    queue_ns: int
    encode_ns: int
    batch_tiles: int


class TileBatcher:
    def __init__(
        self,
        encode: Callable[[torch.Tensor, bool], TileFeatures],
        max_batch_tiles: int,
        max_wait_ms: float,
        max_queued_tiles: int = 0,
        max_batch_ms: float = 0.0,
    ) -> None:
        if max_batch_tiles < 1:
            raise ValueError("max_batch_tiles must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if max_queued_tiles < 0:
            raise ValueError("max_queued_tiles must not be negative")
        self._encode = encode
        self.max_batch_tiles = max_batch_tiles
        self.max_queued_tiles = max_queued_tiles
        self.max_wait_s = max_wait_ms / 1000.0
        self.sizer = BatchSizer(max_batch_tiles, max_batch_ms)
        self._pending: deque[TileRun] = deque()
        self._reserved: dict[Cancellation, int] = {}  # admitted calls' tiles not yet queued
        self._changed = asyncio.Event()  # a run arrived or was withdrawn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vit")
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0
        self.tiles_encoded = 0
        self.busy_ns = 0

    @property
    def queued_tiles(self) -> int:
        """Tiles waiting for a ViT batch (not those being encoded)."""
        return sum(run.num_tiles for run in self._pending if not run.cancellation.cancelled)

    @property
    def admitted_tiles(self) -> int:
        """Tiles admitted and not yet in a batch: queued, or reserved while being tiled.
        The bound applies to these."""
        return self.queued_tiles + sum(self._reserved.values())

    def admit(self, call: Cancellation, tiles: int) -> bool:
        """Reserves room for `tiles` tiles of `call` (its images, counted before tiling)
        and says True, if the admitted tiles stay within max_queued_tiles with them or no
        other call has any admitted (a call alone is never refused, however large: it could
        never run otherwise); else False and nothing is reserved. Each run `call` submits
        then turns part of its reservation into queued tiles."""
        if self.max_queued_tiles:
            mine = self._reserved.get(call, 0) + sum(
                run.num_tiles for run in self._pending if run.cancellation is call
            )
            others = self.admitted_tiles - mine
            if others > 0 and self.admitted_tiles + tiles > self.max_queued_tiles:
                return False
        self._reserved[call] = self._reserved.get(call, 0) + tiles
        return True

    def withdraw(self, call: Cancellation) -> int:
        """Ends `call`'s part in the queue: its reservation goes, and its tiles still waiting
        for a batch are dropped; returns how many tiles were dropped."""
        self._reserved.pop(call, None)
        dropped = sum(run.num_tiles for run in self._pending if run.cancellation is call)
        if dropped:
            self._pending = deque(run for run in self._pending if run.cancellation is not call)
            self._changed.set()  # a batch being gathered may have lost its first tiles
        return dropped

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="tile-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        for run in self._pending:
            run.sink.put_nowait(asyncio.CancelledError("vision server is stopping"))
        self._pending.clear()

    def submit(self, run: TileRun) -> None:
        """Queues `run`, out of its call's reservation when it has one (see `admit`)."""
        reserved = self._reserved.get(run.cancellation)
        if reserved is not None:
            left = reserved - run.num_tiles
            if left > 0:
                self._reserved[run.cancellation] = left
            else:
                del self._reserved[run.cancellation]
        self._pending.append(run)
        self._changed.set()

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _collect(self) -> list[TileRun]:
        while True:
            while not self.queued_tiles:
                self._changed.clear()
                await self._changed.wait()
            capacity = self.sizer.capacity()
            deadline = time.monotonic() + self.max_wait_s
            while 0 < self.queued_tiles < capacity and time.monotonic() < deadline:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
            if self.queued_tiles:  # else all it waited for was withdrawn: wait afresh
                return self._take(capacity)

    def _take(self, capacity: int) -> list[TileRun]:
        batch: list[TileRun] = []
        while self._pending and capacity > 0:
            run = self._pending.popleft()
            if run.cancellation.cancelled:
                continue
            if run.num_tiles > capacity:
                run, rest = run.split(capacity)
                self._pending.appendleft(rest)
            batch.append(run)
            capacity -= run.num_tiles
        return batch

    async def _run(self, batch: list[TileRun]) -> None:
        pixels = torch.cat([run.pixel_values for run in batch])
        with_vir = any(run.with_vir for run in batch)
        started = time.monotonic_ns()
        try:
            features = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._encode, pixels, with_vir
            )
        except Exception as exc:  # delivered to every request in the batch
            log.exception("ViT batch of %d tiles failed", pixels.shape[0])
            for run in batch:
                run.sink.put_nowait(exc)
            return
        encode_ns = time.monotonic_ns() - started
        self.sizer.observe(int(pixels.shape[0]), encode_ns / 1e9)
        self.batches_run += 1
        self.tiles_encoded += int(pixels.shape[0])
        self.busy_ns += encode_ns
        offset = 0
        for run in batch:
            part = features[offset : offset + run.num_tiles]
            offset += run.num_tiles
            run.sink.put_nowait(
                EncodedTiles(
                    run.image_index,
                    run.first_tile,
                    part,
                    started - run.enqueued_ns,
                    encode_ns,
                    int(pixels.shape[0]),
                )
            )
