"""What every model family's VisionService shares: the transports a call's destination
picks, the image-decoding threads, readiness and draining, RdmaConnect and Health.

InternVL's service (vision_server/service.py: tiles, ViR, the tile batcher) and Qwen3-VL's
(vision_server/qwen3vl/service.py: whole images by patches) differ in how a call is encoded,
not in how its features leave or how the server reports itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
import torch

from dvd.deadline import Deadline
from dvd.errors import DvdError, InvalidInput
from dvd.features import torch_dtype
from dvd.transport import DESTINATION_KINDS, Emission, FeatureSender, StaleConnection
from dvd.v1 import common_pb2, vision_pb2
from vision_server.batcher import Cancellation
from vision_server.config import VisionServerConfig
from vision_server.metrics import VisionMetrics
from vision_server.session import EncodeServicer, Sessions

log = logging.getLogger(__name__)


@dataclass
class CallState:
    """One Encode call in progress: what every family tracks (a family extends it)."""

    started_ns: int
    cancellation: Cancellation = field(default_factory=Cancellation)
    units_expected: int = 0  # the family's `unit`s the call encodes (tiles, images)
    units_done: int = 0


StateT = TypeVar("StateT", bound=CallState)


class VisionServiceBase(EncodeServicer, ABC, Generic[StateT]):
    unit = "tiles"
    """What a family queues for its ViT, as the stopped-call log names it."""

    def __init__(
        self,
        config: VisionServerConfig,
        metrics: VisionMetrics,
        senders: dict[str, FeatureSender],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.senders = senders
        self._preprocess_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.sessions = Sessions(self.run_call, metrics.sessions, metrics.session_batch)
        self.ready = True

    def close(self) -> None:
        self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        for sender in self.senders.values():
            sender.close()

    async def drain(self) -> None:
        """Shutdown has begun: calls in flight finish, new ones go elsewhere."""
        self.ready = False
        await self.sessions.drain()

    @property
    @abstractmethod
    def feature_dtype(self) -> torch.dtype:
        """The dtype the encoder produces features in (what a request must ask for)."""

    @abstractmethod
    def _open_call(self, request: vision_pb2.EncodeRequest, state: CallState) -> StateT:
        """The family's checks of a request (after the shared ones in `_check`) and the
        state its call runs with; InvalidInput when the request is refused."""

    @abstractmethod
    def _encode(
        self, request: vision_pb2.EncodeRequest, state: StateT, emission: Emission
    ) -> AsyncIterator[vision_pb2.EncodeResponse]:
        """The call's plans, chunks and done; units queued under `state.cancellation`."""

    @abstractmethod
    def _withdraw(self, call: Cancellation) -> int:
        """Drops what `call` still has queued for the ViT; returns how many units."""

    def _check(self, request: vision_pb2.EncodeRequest) -> None:
        """The checks every family makes: images present, not too many, feature dtype."""
        if not request.images:
            raise InvalidInput("Encode needs at least one image")
        if len(request.images) > self.config.max_images_per_request:
            raise InvalidInput(
                f"{len(request.images)} images in one request; the limit is "
                f"{self.config.max_images_per_request}"
            )
        try:
            wanted = torch_dtype(request.feature_dtype)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if wanted != self.feature_dtype:
            raise InvalidInput(
                f"features are produced in {self.feature_dtype}, request asked for {wanted}"
            )

    async def run_call(
        self, request: vision_pb2.EncodeRequest, deadline: Deadline
    ) -> AsyncGenerator[vision_pb2.EncodeResponse, None]:
        """One Encode call, whether on its own RPC or on a session; DvdError when it fails.
        The caller stops it when `deadline` passes; its units still queued are dropped."""
        base = CallState(started_ns=time.monotonic_ns())
        state: CallState = base
        emission: Emission | None = None
        self.metrics.in_flight.inc()
        status = "ok"
        done = False
        try:
            self._check(request)
            opened = self._open_call(request, base)
            state = opened
            emission = self._emission(request)
            async for message in self._encode(request, opened, emission):
                done = message.HasField("done")
                yield message
        except DvdError as exc:
            status = exc.code.name.lower()
            log.info("encode %s rejected: %s", request.request_id, exc.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # A caller that has its `done` may cancel before the stream's end: that is a
            # finished call, not a stopped one.
            if not done:
                status = "deadline_exceeded" if deadline.expired() else "cancelled"
            raise
        finally:
            base.cancellation.cancelled = True  # units still queued are skipped
            dropped = self._withdraw(base.cancellation)
            self.metrics.tiles_dropped.inc(dropped)
            if status in ("deadline_exceeded", "cancelled"):
                self._log_stopped(request.request_id, status, state, dropped)
            if emission is not None:
                emission.close()
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(status).inc()

    def _log_stopped(self, request_id: str, status: str, state: CallState, dropped: int) -> None:
        why = "its deadline passed" if status == "deadline_exceeded" else "the caller cancelled it"
        if status == "deadline_exceeded":
            self.metrics.expired.inc()
        log.info(
            "encode %s stopped: %s after %.1f ms, %d of %d %s encoded, %d queued %s dropped",
            request_id,
            why,
            (time.monotonic_ns() - state.started_ns) / 1e6,
            state.units_done,
            state.units_expected,
            self.unit,
            dropped,
            self.unit,
        )

    def _emission(self, request: vision_pb2.EncodeRequest) -> Emission:
        """The transport the request's destination names (grpc when it names none)."""
        kind = request.destination.WhichOneof("kind")
        name = DESTINATION_KINDS[kind] if kind else "grpc"
        sender = self.senders.get(name)
        if sender is None:
            raise InvalidInput(
                f"transport {name} is not enabled on this vision server "
                f"(enabled: {', '.join(self.senders)})"
            )
        try:
            return sender.open(request)
        except StaleConnection as exc:  # we restarted since the caller connected
            raise DvdError(f"{name}: {exc}", code=grpc.StatusCode.FAILED_PRECONDITION) from None
        except ValueError as exc:
            raise InvalidInput(f"{name} destination: {exc}") from None

    async def RdmaConnect(
        self, request: vision_pb2.RdmaConnectRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.RdmaConnectResponse:
        sender = self.senders.get("rdma")
        if sender is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "the rdma transport is not enabled on this server"
            )
        try:
            return sender.connect(request)  # type: ignore[union-attr]
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rdma connect: {exc}")
            raise  # abort raises; this keeps type checkers informed

    async def Health(
        self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.HealthResponse:
        if self.ready:
            return common_pb2.HealthResponse(status=common_pb2.HealthResponse.STATUS_SERVING)
        return common_pb2.HealthResponse(
            status=common_pb2.HealthResponse.STATUS_NOT_SERVING, detail="draining"
        )
