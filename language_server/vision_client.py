"""DvD mode: features come from vision servers over gRPC, their bytes through a transport.

Each request goes to the vision server with the fewest images in flight from this
language server (ties: round robin). It travels as a call on that server's EncodeSession
stream (dvd.encode_session), or, when its bytes travel inside the stream (grpc), on an
Encode RPC of its own. A request that fails with UNAVAILABLE before any response arrived
is retried once on another server; after the first response it is not. The transport's
receiver (dvd.transport) prepares where the features land; its memory is released once
the prompt has been assembled from them (EncodedImages.release).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc
import torch

from dvd import vir_mode
from dvd.encode_session import CallFailed, EncodeCall, EncodeSession
from dvd.errors import DvdError, InvalidInput, Unavailable
from dvd.features import wire_dtype
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.transport import FeatureReceiver, Reception
from dvd.transport.base import RequestShape
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from dvd.vir_mode import VirMode
from language_server.image_features import EncodedImages

log = logging.getLogger(__name__)


class VisionServer:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.session = EncodeSession(self.stub)  # every Encode call to it goes here
        self.images_in_flight = 0
        self.connection: str | None = None  # the transport's connection id, once attached


class VisionPool:
    def __init__(
        self,
        addresses: list[str],
        dtype: torch.dtype,
        timeout_s: float,
        receiver: FeatureReceiver,
        max_rows_per_image: int,
        hidden: int,
    ) -> None:
        if not addresses:
            raise ValueError("DvD mode needs at least one vision server address")
        self.servers = [VisionServer(a) for a in addresses]
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.receiver = receiver
        self.image_capacity = max_rows_per_image * hidden * dtype.itemsize
        self.hidden = hidden
        self._turn = itertools.count()

    def _pick(self, exclude: VisionServer | None = None) -> VisionServer:
        candidates = [s for s in self.servers if s is not exclude] or self.servers
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda s: s.images_in_flight)

    async def encode(
        self, request_id: str, images: list[bytes], mode: VirMode | None = None
    ) -> EncodedImages:
        request = vision_pb2.EncodeRequest(
            request_id=request_id,
            images=[vision_pb2.ImageInput(data=d) for d in images],
            feature_dtype=wire_dtype(self.dtype),
            vir_mode=vir_mode.to_wire(mode),
        )
        server = self._pick()
        try:
            return await self._encode_on(server, request)
        except _RetryableError:
            # Another server if there is one; a lone server gets one more try (it may
            # have just restarted, and the retry connects afresh).
            other = self._pick(exclude=server)
            log.warning(
                "request %s: vision server %s unavailable, retrying on %s",
                request_id,
                server.address,
                other.address,
            )
            try:
                return await self._encode_on(other, request)
            except _RetryableError:
                raise Unavailable("no vision server is available") from None

    async def _connection(self, server: VisionServer) -> str:
        """The transport's connection to `server`, made before its first request."""
        if server.connection is None:
            try:
                server.connection = await self.receiver.attach(server.address, server.stub)
            except (ValueError, grpc.aio.AioRpcError) as exc:
                log.warning(
                    "cannot connect the %s transport to %s: %s",
                    self.receiver.name,
                    server.address,
                    exc,
                )
                raise _RetryableError() from None
        return server.connection

    async def _encode_on(
        self, server: VisionServer, request: vision_pb2.EncodeRequest
    ) -> EncodedImages:
        count = len(request.images)
        shape = RequestShape(
            request.request_id,
            [self.image_capacity] * count,
            self.hidden,
            self.dtype,
            connection_id=await self._connection(server),
        )
        reception = self.receiver.open(shape)
        request.ClearField("destination")
        if reception.destination is not None:
            request.destination.CopyFrom(reception.destination)
        server.images_in_flight += count
        call: EncodeCall | None = None
        progress = _Progress()
        try:
            async with asyncio.timeout(self.timeout_s):
                call = await server.session.call(request, self.timeout_s)
                encoded = await self._receive(call, server.address, reception, progress)
        except CallFailed as exc:
            reception.release()
            restarted = exc.code in (
                grpc.StatusCode.UNAVAILABLE,  # it is gone, or on its way back
                grpc.StatusCode.FAILED_PRECONDITION,  # it came back and forgot our connection
            )
            if restarted and not progress.started:
                server.connection = None  # connect afresh before the next request
                raise _RetryableError() from None
            raise _from_call_error(exc, server.address) from None
        except TimeoutError:
            reception.release()
            raise DvdError(
                f"vision server {server.address} did not finish within {self.timeout_s:.0f} s",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except ValueError as exc:  # the transport refused what the server sent
            reception.release()
            raise DvdError(f"vision server {server.address} sent bad features: {exc}") from None
        except BaseException:
            reception.release()
            raise
        finally:
            server.images_in_flight -= count
            if call is not None:
                call.cancel()  # no-op when finished; stops the encode when we gave up
        encoded.release = reception.release
        return encoded

    async def _receive(
        self,
        call: EncodeCall,
        address: str,
        reception: Reception,
        progress: _Progress,
    ) -> EncodedImages:
        plans: dict[int, list[int]] = {}
        first_ns = last_ns = 0
        async for message in call:
            progress.started = True
            last_ns = time.monotonic_ns()
            first_ns = first_ns or last_ns
            kind = message.WhichOneof("kind")
            if kind == "plan":
                reception.on_plan(message.plan)
                plans[message.plan.image_index] = list(message.plan.tokens_per_tile)
            elif kind == "chunk":
                reception.on_chunk(message.chunk)
            elif kind == "done":
                await reception.settle(self.timeout_s)
                timings = message.done.timings
                return EncodedImages(
                    reception.features(),
                    tokens_per_tile=[plans[i] for i in sorted(plans)],
                    preprocess_ns=timings.preprocess_ns,
                    queue_ns=timings.queue_ns,
                    encode_ns=timings.encode_ns,
                    transfer_ns=max(last_ns - first_ns, timings.transfer_ns),
                    server=address,
                )
        raise DvdError(f"vision server {address} ended the stream without finishing")

    async def healthy(self) -> list[tuple[str, bool]]:
        results = []
        for server in self.servers:
            try:
                reply = await server.stub.Health(common_pb2.HealthRequest(), timeout=2.0)
                ok = reply.status == common_pb2.HealthResponse.STATUS_SERVING
            except grpc.aio.AioRpcError:
                ok = False
            results.append((server.address, ok))
        return results

    async def close(self) -> None:
        for server in self.servers:
            await server.session.close()
            await server.channel.close()
        self.receiver.close()


class _Progress:
    started = False


class _RetryableError(Exception):
    """The server could not be reached before it sent anything."""


def _from_call_error(exc: CallFailed, address: str) -> Exception:
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"vision server {address} went away: {exc.details}")
    if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(exc.details or "invalid image")
    return DvdError(f"vision server {address}: {exc.details}", code=exc.code)
