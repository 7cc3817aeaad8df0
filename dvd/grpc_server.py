"""Running a grpc.aio server until SIGTERM/SIGINT, then draining in-flight calls; closing
a streaming handler's work when its call ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from dvd.grpc_options import SERVER_OPTIONS
from dvd.tls import Tls, describe_listener

log = logging.getLogger(__name__)


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS)


def bind(server: grpc.aio.Server, address: str, tls: Tls | None = None) -> int:
    """Binds a port, TLS (mTLS when `tls` has a CA) or plaintext when `tls` is None; a
    clear error when the address is taken or invalid."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.server_credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


async def serve_until_signal(
    server: grpc.aio.Server,
    name: str,
    address: str,
    grace_s: float,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    on_draining: Callable[[], Awaitable[None]] | None = None,
    tls: Tls | None = None,
) -> None:
    """Starts `server`, waits for SIGTERM/SIGINT, stops taking calls and drains for grace_s.

    `on_draining` runs first, while the server still serves: long-lived streams use it to
    finish their calls and end themselves within the grace period. `on_stop` runs last.
    `tls` is what the port was bound with, for the log.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("%s listening on %s (%s)", name, address, describe_listener(tls))
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("%s stopping; in-flight calls get %.0f s to finish", name, grace_s)
    if on_draining is not None:
        await on_draining()
    await server.stop(grace_s)
    stopper.cancel()
    if on_stop is not None:
        await on_stop()
    log.info("%s stopped", name)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


_closing: set[asyncio.Task[None]] = set()  # closes under way (the loop keeps weak refs)


def close_when_done(context: grpc.aio.ServicerContext, work: AsyncGenerator[Any, None]) -> None:
    """Closes `work`, the generator a streaming handler relays, as soon as its call ends.

    gRPC cancels a handler whose caller left or whose deadline passed. When that lands while
    gRPC itself is writing one of the handler's messages, the handler's generators are left
    suspended at a `yield` and only closed when the garbage collector finds them, so their
    `finally` blocks (abort the LLM request, drop queued tiles, count and log the call) wait
    for it. Closing `work` from the call's done callback runs them at once. A generator the
    cancellation landed in is still running then, and finishes by itself.
    """

    def on_done(_: object) -> None:
        task = asyncio.get_running_loop().create_task(_close(work))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    context.add_done_callback(on_done)


async def _close(work: AsyncGenerator[Any, None]) -> None:
    with contextlib.suppress(RuntimeError):  # "already running": it is finishing by itself
        await work.aclose()
