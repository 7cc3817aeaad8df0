"""When requests are sent: arrival processes and the dispatcher that follows them.

Two kinds of traffic:

- fixed concurrency (`request_rate=None`, `max_in_flight=N`): N requests in flight, the next
  one sent as soon as one finishes (a closed loop);
- an arrival rate (an open loop): request i is due at the i-th offset of a Poisson process
  (exponential gaps, seeded) or of an evenly spaced one; with `max_in_flight`, a due request
  waits for a free slot, and later ones keep their own due times.

The dispatcher knows nothing of HTTP: it calls `send(index, due_s)` for each request and
gathers what those calls return, in send order.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from benchmarks.serve.config import BenchConfig

T = TypeVar("T")

ARRIVALS = ("poisson", "constant")


@dataclass(frozen=True)
class Schedule:
    request_rate: float | None = None
    """Requests per second (inf: all due at once); None: send as slots free up."""
    arrival: str = "poisson"
    max_in_flight: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.request_rate is None and self.max_in_flight is None:
            raise ValueError("max_in_flight: needed when there is no request_rate")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate: must be positive, got {self.request_rate}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be at least 1, got {self.max_in_flight}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival: {self.arrival!r} is not one of {', '.join(ARRIVALS)}")

    @classmethod
    def of(cls, config: BenchConfig) -> Schedule:
        if config.concurrency is not None:
            return cls(max_in_flight=config.concurrency, seed=config.seed)
        seed = config.seed if config.arrival_seed is None else config.arrival_seed
        return cls(config.request_rate, config.arrival, config.max_concurrency, seed)

    def offsets(self) -> Iterator[float]:
        """Due times (s from the start) of requests 0, 1, 2, ...: endless."""
        if self.request_rate is None:
            return itertools.repeat(0.0)
        return arrival_offsets(self.request_rate, self.arrival, self.seed)


def arrival_offsets(rate: float, arrival: str, seed: int = 0) -> Iterator[float]:
    """Endless due times of an arrival process at `rate` requests/s; the first is 0.

    "constant": i / rate exactly. "poisson": gaps drawn from Exp(rate), seeded by `seed`.
    An infinite rate makes every request due at 0.
    """
    if not rate > 0:
        raise ValueError(f"rate: must be positive, got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival: {arrival!r} is not one of {', '.join(ARRIVALS)}")
    if math.isinf(rate):
        yield from itertools.repeat(0.0)
    elif arrival == "constant":
        for index in itertools.count():
            yield index / rate
    else:
        rng = random.Random(seed)
        due = 0.0
        while True:
            yield due
            due += rng.expovariate(rate)


async def dispatch(
    schedule: Schedule,
    send: Callable[[int, float], Awaitable[T]],
    *,
    max_requests: int | None,
    duration_s: float | None,
    origin: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[T]:
    """Sends requests as `schedule` says until `max_requests` were sent or `duration_s` passed.

    `send(index, due_s)` is called once per request, `due_s` being when it was due (s from
    `origin`, default now; with fixed concurrency, when its slot freed). Requests in flight
    at the end are awaited. Results come back in send order.
    """
    if max_requests is None and duration_s is None:
        raise ValueError("max_requests, duration_s: give at least one")
    start = clock() if origin is None else origin
    slots = asyncio.Semaphore(schedule.max_in_flight) if schedule.max_in_flight else None

    async def send_in_slot(index: int, due_s: float) -> T:
        try:
            return await send(index, due_s)
        finally:
            if slots is not None:
                slots.release()

    tasks: list[asyncio.Task[T]] = []
    try:
        for index, due_s in enumerate(schedule.offsets()):
            if max_requests is not None and index >= max_requests:
                break
            if duration_s is not None and due_s >= duration_s:
                break
            delay = start + due_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            now = clock() - start
            if duration_s is not None and now >= duration_s:
                if slots is not None:
                    slots.release()
                break
            if schedule.request_rate is None:
                due_s = now
            tasks.append(asyncio.create_task(send_in_slot(index, due_s)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
