"""What both coupled modes share: the vision model in this process, on one worker thread.

`CoupledVision` (InternVL) and `Qwen3VLCoupledVision` differ in how they turn a request's
items into rows; this base runs that work one request at a time on its thread, refuses a
request whose deadline passed while it waited for the thread, stamps how long it waited
(queue_ns), and answers the feature-source calls a pool of vision servers would (no members
to start, list or check).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from dvd.deadline import Deadline
from dvd.errors import DvdError
from language_server.image_features import EncodedImages


class InProcessVision:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coupled-vit")

    async def run_encode(
        self, deadline: Deadline, encode_all: Callable[[], EncodedImages]
    ) -> EncodedImages:
        """`encode_all()` on the worker thread, after the requests queued before it."""
        queued = time.monotonic_ns()

        def timed() -> EncodedImages:
            if deadline.expired():  # it waited for the worker past its deadline
                raise DvdError(
                    "the request's deadline passed before its images were encoded",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            started = time.monotonic_ns()
            result = encode_all()
            result.queue_ns = started - queued
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    async def start(self) -> None:
        """Nothing to connect to: the vision model is in this process."""

    def member_addresses(self) -> list[str]:
        return []

    async def healthy(self) -> list[tuple[str, bool]]:
        return []

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
