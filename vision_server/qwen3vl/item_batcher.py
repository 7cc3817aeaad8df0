"""Packs Qwen3-VL items (images) from concurrent requests into ViT forwards by patches.

The Qwen3-VL counterpart of `vision_server.batcher.TileBatcher`: items have variable
length (t x h x w patches) and are never split, so a forward takes whole items in arrival
order while their patches fit the capacity (an item over it runs alone), or what has
arrived once `max_wait_ms` has passed since the first. The capacity is `max_batch_patches`,
or fewer where that many would take longer than `max_batch_ms` (see batch_sizer). The
tower runs on one dedicated thread, so the event loop keeps streaming the previous
forward's rows meanwhile.

The queue is bounded in patches (`max_queued_patches`, 0: unbounded), admitted per call as
a whole before any of its items is preprocessed, with the same rule as TileBatcher: a call
that would take the queue past the bound is refused unless no other call has patches
admitted (a call larger than the bound still runs on an idle server). A call that ends early
withdraws its queued items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vision_server.batch_sizer import BatchSizer
from vision_server.batcher import Cancellation
from vision_server.qwen3vl.encoder import EncodedItem, Qwen3VLEncoder
from vision_server.qwen3vl.preprocess import VisionInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedResult:
    """One item's rows and how long it waited and took (ns)."""

    item: EncodedItem
    queue_ns: int
    encode_ns: int
    batch_patches: int


@dataclass
class _Queued:
    item: VisionInput
    future: asyncio.Future[EncodedResult]
    cancellation: Cancellation
    enqueued_ns: int = field(default_factory=time.monotonic_ns)


class ItemBatcher:
    def __init__(
        self,
        encoder: Qwen3VLEncoder,
        max_batch_patches: int,
        max_wait_ms: float,
        max_queued_patches: int = 0,
        max_batch_ms: float = 0.0,
    ) -> None:
        if max_batch_patches < 1 or max_wait_ms < 0 or max_queued_patches < 0:
            raise ValueError("max_batch_patches >= 1, max_wait_ms >= 0, max_queued_patches >= 0")
        self.encoder = encoder
        self.max_batch_patches = max_batch_patches
        self.max_wait_s = max_wait_ms / 1000
        self.max_queued_patches = max_queued_patches
        self.sizer = BatchSizer(max_batch_patches, max_batch_ms)
        self._pending: deque[_Queued] = deque()
        self._admitted: dict[Cancellation, int] = {}
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen3vl-vit")
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0

    @property
    def admitted_patches(self) -> int:
        """Patches of admitted calls not encoded yet (queued or being preprocessed)."""
        return sum(self._admitted.values())

    def admit(self, call: Cancellation, patches: int) -> bool:
        """Reserves room for a call's patches; False when it would overfill a busy queue."""
        bound = self.max_queued_patches
        busy = any(count > 0 for count in self._admitted.values())
        if bound and busy and self.admitted_patches + patches > bound:
            return False
        self._admitted[call] = self._admitted.get(call, 0) + patches
        return True

    def withdraw(self, call: Cancellation) -> int:
        """Forgets a call's reservation and queued items; the items dropped."""
        self._admitted.pop(call, None)
        dropped = [q for q in self._pending if q.cancellation is call]
        for queued in dropped:
            self._pending.remove(queued)
            queued.future.cancel()
        return len(dropped)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        for queued in self._pending:
            queued.future.cancel()
        self._pending.clear()

    def submit(self, item: VisionInput, call: Cancellation) -> asyncio.Future[EncodedResult]:
        """Queues one item; its future resolves with its rows."""
        future: asyncio.Future[EncodedResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Queued(item, future, call))
        self._changed.set()
        return future

    def _queued_patches(self) -> int:
        return sum(q.item.num_patches for q in self._pending)

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                self._changed.clear()
                await self._changed.wait()
            capacity = self.sizer.capacity()
            deadline = time.monotonic() + self.max_wait_s
            while self._queued_patches() < capacity and time.monotonic() < deadline:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
            batch = self._take(capacity)
            if batch:
                await self._run(batch)

    def _take(self, capacity: int) -> list[_Queued]:
        batch: list[_Queued] = []
        total = 0
        while self._pending:
            queued = self._pending[0]
            if queued.cancellation.cancelled or queued.future.done():
                self._pending.popleft()
                continue
            if batch and total + queued.item.num_patches > capacity:
                break
            batch.append(self._pending.popleft())
            total += queued.item.num_patches
        return batch

    async def _run(self, batch: list[_Queued]) -> None:
        items = [queued.item for queued in batch]
        patches = sum(item.num_patches for item in items)
        started = time.monotonic_ns()
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.encoder.encode_batch, items
            )
        except Exception as exc:  # delivered to every call in the forward
            log.exception("Qwen3-VL forward of %d items (%d patches) failed", len(items), patches)
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            return
        encode_ns = time.monotonic_ns() - started
        self.sizer.observe(patches, encode_ns / 1e9)
        self.batches_run += 1
        for queued, rows in zip(batch, encoded, strict=True):
            self._release(queued.cancellation, queued.item.num_patches)
            if not queued.future.done():
                result = EncodedResult(rows, started - queued.enqueued_ns, encode_ns, patches)
                queued.future.set_result(result)

    def _release(self, call: Cancellation, patches: int) -> None:
        left = self._admitted.get(call, 0) - patches
        if left > 0:
            self._admitted[call] = left
        else:
            self._admitted.pop(call, None)
