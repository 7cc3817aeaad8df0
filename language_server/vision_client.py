"""DvD mode: features come from vision servers over gRPC, their bytes through a transport.

The pool's members are vision server processes: every address given, and every address a
DNS name resolves to (dvd.discovery: re-resolved every few seconds and when a call fails;
a member gone from DNS finishes its calls and leaves). Each member has its own channel,
EncodeSession and load count, so balancing happens here, per request, never inside a
long-lived stream. A request goes to the member its routing picks (dvd.routing):
cache-affine (default) sends it to the member that rendezvous hashing of its first image's
content picks, unless that member is over its load bound, so a conversation that resends
its images (every turn does) finds them in that member's encoder cache; least-loaded sends
it to the member with the fewest images in flight (ties round robin).

A request travels as a call on the member's EncodeSession stream (dvd.encode_session), or,
when its bytes travel inside the stream (grpc), on an Encode RPC of its own. A request whose
member fails with UNAVAILABLE (the process is gone, or restarted and forgot us) is retried
once on another member, also when some of its features had arrived: none of them is used
before the request is done. That member then sits out COOLDOWN_S while others are
available. A member that refuses a request with RESOURCE_EXHAUSTED (its tile queue is full)
is alive and only busy: the request moves on to a member not tried yet, the busy one is
passed over for BUSY_BACKOFF_S while others are available, and when every member has
refused, the request fails with RESOURCE_EXHAUSTED (the gateway then answers 429).

Every call gets the smaller of `timeout_s` and what is left of the request's deadline (the
incoming Generate call's), across retries, as its gRPC deadline: the vision server stops
work nobody will wait for. The transport's receiver (dvd.transport) prepares where the
features land; its memory is released once the prompt has been assembled from them
(EncodedImages.release).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Sequence

import grpc
import torch

from dvd import vir_mode
from dvd.deadline import Deadline
from dvd.discovery import Members, make_resolver, parse_targets
from dvd.encode_session import CallFailed, EncodeCall, EncodeSession
from dvd.errors import DvdError, InvalidInput, Overloaded, Unavailable
from dvd.features import wire_dtype
from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.routing import CACHE_AFFINE, VISION_ROUTINGS, LeastLoaded, bounded_affinity
from dvd.tls import Tls, describe_client, open_channel
from dvd.transport import FeatureReceiver, Reception
from dvd.transport.base import RequestShape
from dvd.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from dvd.vir_mode import VirMode
from language_server.image_features import EncodedImages, VideoClip, VisualItem
from language_server.metrics import LanguageMetrics

log = logging.getLogger(__name__)

DEFAULT_RESOLVE_S = 5.0
COOLDOWN_S = 5.0
"""How long a member that failed UNAVAILABLE is passed over while others are available."""
BUSY_BACKOFF_S = 1.0
"""How long a member that refused a request (RESOURCE_EXHAUSTED: its queue is full) is
passed over while others are available: a few ViT batches, time for its queue to drain."""
QUARANTINE_S = 30.0
"""How long the memory of a request cut off halfway is held before it is reused."""


class VisionServer:
    """One member: a vision server process at one address, dialled as `name` (the DNS name
    it came from, or the address: what its TLS certificate must carry)."""

    def __init__(self, address: str, name: str, tls: Tls | None = None) -> None:
        self.address = address
        self.channel = open_channel(address, name, tls, CHANNEL_OPTIONS)
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.session = EncodeSession(self.stub)  # every Encode call to it goes here
        self.images_in_flight = 0
        self.connection: str | None = None  # the transport's connection id, once attached
        self.unavailable_until = 0.0
        """time.monotonic() before which requests avoid it (it just failed UNAVAILABLE)."""
        self.busy_until = 0.0
        """time.monotonic() before which requests avoid it (it just refused one: busy)."""

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()


class VisionPool:
    def __init__(
        self,
        targets: Sequence[str],
        dtype: torch.dtype,
        timeout_s: float,
        receiver: FeatureReceiver,
        max_rows_per_image: int,
        hidden: int,
        *,
        routing: str = CACHE_AFFINE,
        rows_per_tile: int = 0,
        resolve_s: float = DEFAULT_RESOLVE_S,
        dns_server: str = "",
        metrics: LanguageMetrics | None = None,
        tls: Tls | None = None,
        rows_of: Callable[[vision_pb2.ImageInput], int] | None = None,
    ) -> None:
        """`rows_of`: an item's most rows (Qwen3-VL: an image's or a video's, from the
        header(s) and the pixel budgets), so each item's region is sized to it; None: every
        image gets room for `max_rows_per_image`."""
        if routing not in VISION_ROUTINGS:
            raise ValueError(f"vision_routing must be one of {VISION_ROUTINGS}, not {routing!r}")
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.receiver = receiver
        self.image_capacity = max_rows_per_image * hidden * dtype.itemsize
        self.rows_of = rows_of
        self.tile_capacity = rows_per_tile * hidden * dtype.itemsize
        """Bytes of one tile's rows (0: unknown), so an image with few tiles (a video frame's
        one) reserves no more than it can fill in an shm or tcp destination."""
        self.hidden = hidden
        self.routing = routing
        self.metrics = metrics or LanguageMetrics()
        self.members = Members(
            parse_targets(targets),
            make_resolver(dns_server),
            lambda address, name: VisionServer(address, name, tls),
            lambda server: server.images_in_flight > 0,
            self._close_member,
            resolve_s,
            "vision pool",
        )
        self._least_loaded = LeastLoaded()
        self._started: asyncio.Task[None] | None = None
        log.info("vision pool: calls vision servers over %s", describe_client(tls))

    async def start(self) -> None:
        """Resolves the targets and starts re-resolving; idempotent (encode calls it)."""
        if self._started is None:
            self._started = asyncio.create_task(self.members.start())
        await asyncio.shield(self._started)

    def member_addresses(self) -> list[str]:
        return list(self.members.active)

    @property
    def servers(self) -> list[VisionServer]:
        """The members new requests may go to."""
        return list(self.members.active.values())

    def _pick(self, key: bytes, exclude: Collection[VisionServer] = ()) -> VisionServer:
        """The member for a request among those not in `exclude` (all, if every member is),
        preferring members that did not just fail or refuse one."""
        servers = self.servers
        if not servers:
            self.members.refresh_soon()
            raise Unavailable("no vision server is known: the pool's names resolve to nothing")
        candidates = [s for s in servers if s not in exclude] or servers
        now = time.monotonic()
        candidates = [s for s in candidates if s.unavailable_until <= now] or candidates
        candidates = [s for s in candidates if s.busy_until <= now] or candidates
        if self.routing == CACHE_AFFINE:
            return bounded_affinity(
                candidates, key, lambda s: s.address, lambda s: s.images_in_flight
            )
        return self._least_loaded.pick(candidates, lambda s: s.images_in_flight)

    async def encode(
        self,
        request_id: str,
        images: Sequence[VisualItem],
        mode: VirMode | None = None,
        deadline: Deadline = Deadline(),
        max_tiles: Sequence[int] = (),
    ) -> EncodedImages:
        await self.start()
        bounds = list(max_tiles) or [0] * len(images)
        request = vision_pb2.EncodeRequest(
            request_id=request_id,
            images=[_wire_item(item, t) for item, t in zip(images, bounds, strict=True)],
            feature_dtype=wire_dtype(self.dtype),
            vir_mode=vir_mode.to_wire(mode),
        )
        # The first image (a video's first frame) anchors a conversation: later turns
        # resend it (and add more).
        key = hashlib.blake2b(_anchor(images[0]) if images else b"", digest_size=16).digest()
        tried: list[VisionServer] = []
        refusals: list[str] = []
        unavailable = 0
        server = self._pick(key)
        while True:
            tried.append(server)
            try:
                return await self._encode_on(server, request, deadline)
            except _RetryableError:
                self.metrics.vision_calls.labels(server.address, "retried").inc()
                self.members.refresh_soon()  # its pod may be gone or replaced
                unavailable += 1
                if unavailable > 1:
                    raise Unavailable("no vision server is available") from None
                # Another server if there is one; a lone server gets one more try (it may
                # have just restarted, and the retry connects afresh).
                other = self._pick(key, exclude=tried)
                log.warning(
                    "request %s: vision server %s unavailable, retrying on %s",
                    request_id,
                    server.address,
                    other.address,
                )
            except _Busy as busy:
                self.metrics.vision_calls.labels(server.address, "busy").inc()
                server.busy_until = time.monotonic() + BUSY_BACKOFF_S
                refusals.append(busy.details)
                if all(s in tried for s in self.servers):
                    self.metrics.refused.labels("vision").inc()
                    raise Overloaded(
                        "no vision server has room for the request: " + "; ".join(refusals)
                    ) from None
                other = self._pick(key, exclude=tried)
                log.info(
                    "request %s: vision server %s is busy, trying %s",
                    request_id,
                    server.address,
                    other.address,
                )
            server = other

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

    def _capacity(self, image: vision_pb2.ImageInput) -> int:
        """Bytes to reserve for an image's rows, at most the largest image's: from its header
        when the family sizes images by pixels (`rows_of`, Qwen3-VL), else its tiles' (and
        the thumbnail that comes with more than one) when it names a tile limit."""
        if self.rows_of is not None:
            rows_bytes = self.rows_of(image) * self.hidden * self.dtype.itemsize
            # a video's budget is its own (all frames together), not the largest image's
            return rows_bytes if image.HasField("video") else min(self.image_capacity, rows_bytes)
        if image.max_tiles <= 0 or not self.tile_capacity:
            return self.image_capacity
        tiles = image.max_tiles + (1 if image.max_tiles > 1 else 0)
        return min(self.image_capacity, tiles * self.tile_capacity)

    async def _encode_on(
        self, server: VisionServer, request: vision_pb2.EncodeRequest, deadline: Deadline
    ) -> EncodedImages:
        timeout_s = deadline.cap(self.timeout_s)
        if timeout_s <= 0:
            raise DvdError(
                "the request's deadline passed before its images were encoded",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        count = len(request.images)
        shape = RequestShape(
            request.request_id,
            [self._capacity(image) for image in request.images],
            self.hidden,
            self.dtype,
            connection_id=await self._connection(server),
        )
        reception = self.receiver.open(shape)
        request.ClearField("destination")
        if reception.destination is not None:
            request.destination.CopyFrom(reception.destination)
        server.images_in_flight += count
        self.metrics.vision_in_flight.labels(server.address).set(server.images_in_flight)
        self.metrics.vision_images.labels(server.address).inc(count)
        call: EncodeCall | None = None
        progress = _Progress()
        try:
            async with asyncio.timeout(timeout_s):
                call = await server.session.call(request, timeout_s)
                encoded = await self._receive(call, server.address, reception, progress, timeout_s)
        except CallFailed as exc:
            restarted = exc.code in (
                grpc.StatusCode.UNAVAILABLE,  # it is gone, or on its way back
                grpc.StatusCode.FAILED_PRECONDITION,  # it came back and forgot our connection
            )
            if restarted:
                # Nothing of a request reaches the prompt before its `done`, so a request
                # cut off halfway is as safe to send elsewhere as one that never started.
                # Only the memory the lost server may still have been writing into (shm,
                # rdma: a server cut off from us need not have stopped) waits a while
                # before anyone else gets it.
                if progress.started:
                    self._quarantine(reception)
                else:
                    reception.release()
                server.connection = None  # connect afresh before the next request
                server.unavailable_until = time.monotonic() + COOLDOWN_S
                raise _RetryableError() from None
            if exc.busy:  # its queue is full: busy, not broken
                if progress.started:  # refused after some images were planned
                    self._quarantine(reception)
                else:
                    reception.release()
                raise _Busy(exc.details or f"vision server {server.address} is busy") from None
            reception.release()
            self.metrics.vision_calls.labels(server.address, "error").inc()
            raise _from_call_error(exc, server.address) from None
        except TimeoutError:
            self.metrics.vision_calls.labels(server.address, "error").inc()
            reception.release()
            limit = (
                f"--vision-timeout-s {self.timeout_s:g}"
                if timeout_s >= self.timeout_s
                else "the request's deadline"
            )
            raise DvdError(
                f"vision server {server.address} did not finish within {timeout_s:.1f} s ({limit})",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except ValueError as exc:  # the transport refused what the server sent
            self.metrics.vision_calls.labels(server.address, "error").inc()
            reception.release()
            raise DvdError(f"vision server {server.address} sent bad features: {exc}") from None
        except BaseException:
            reception.release()
            raise
        finally:
            server.images_in_flight -= count
            if server.address in self.members.active:
                self.metrics.vision_in_flight.labels(server.address).set(server.images_in_flight)
            if call is not None:
                call.cancel()  # no-op when finished; stops the encode when we gave up
        encoded.release = reception.release
        server.unavailable_until = server.busy_until = 0.0
        self.metrics.vision_calls.labels(server.address, "ok").inc()
        return encoded

    async def _receive(
        self,
        call: EncodeCall,
        address: str,
        reception: Reception,
        progress: _Progress,
        timeout_s: float,
    ) -> EncodedImages:
        plans: dict[int, vision_pb2.ImagePlan] = {}
        first_ns = last_ns = 0
        async for message in call:
            progress.started = True
            last_ns = time.monotonic_ns()
            first_ns = first_ns or last_ns
            kind = message.WhichOneof("kind")
            if kind == "plan":
                reception.on_plan(message.plan)
                plans[message.plan.image_index] = message.plan
            elif kind == "chunk":
                reception.on_chunk(message.chunk)
            elif kind == "done":
                await reception.settle(timeout_s)
                self.metrics.vision_tiles.labels(address).inc(message.done.num_tiles)
                self.metrics.vision_cache_hits.labels(address).inc(message.done.images_from_cache)
                timings = message.done.timings
                return EncodedImages(
                    reception.features(),
                    tokens_per_tile=[list(plans[i].tokens_per_tile) for i in sorted(plans)],
                    grids=[tuple(plans[i].grid_thw) for i in sorted(plans)],
                    content_keys=[plans[i].content_key for i in sorted(plans)],
                    timestamps=[tuple(plans[i].patch_times_s) for i in sorted(plans)],
                    preprocess_ns=timings.preprocess_ns,
                    queue_ns=timings.queue_ns,
                    encode_ns=timings.encode_ns,
                    transfer_ns=max(last_ns - first_ns, timings.transfer_ns),
                    server=address,
                )
        raise DvdError(f"vision server {address} ended the stream without finishing")

    async def healthy(self) -> list[tuple[str, bool]]:
        """Every active member's Health, asked at once (a member gone from DNS is not
        asked: it gets no new calls)."""
        await self.start()
        servers = self.servers
        results = list(await asyncio.gather(*(_serving(s) for s in servers)))
        self.metrics.healthy_vision_members.set(sum(results))
        self.metrics.vision_members.labels("active").set(len(servers))
        self.metrics.vision_members.labels("draining").set(len(self.members.draining))
        if not all(results):
            self.members.refresh_soon()
        return [(s.address, ok) for s, ok in zip(servers, results, strict=True)]

    def _quarantine(self, reception: Reception) -> None:
        """Releases `reception` once a lost server can no longer be writing into it."""
        delay = min(self.timeout_s, QUARANTINE_S)
        asyncio.get_running_loop().call_later(delay, reception.release)

    async def _close_member(self, server: VisionServer) -> None:
        # An rdma connection (queue pair) to a departed member stays registered until the
        # receiver closes: its memory is the receiver's one buffer, not per member.
        await server.close()
        self.metrics.forget_vision_member(server.address)

    async def close(self) -> None:
        await self.members.stop()
        self.receiver.close()


def _wire_item(item: VisualItem, max_tiles: int) -> vision_pb2.ImageInput:
    if isinstance(item, VideoClip):
        video = vision_pb2.VideoInput(frames=item.frames, timestamps_s=item.timestamps_s)
        return vision_pb2.ImageInput(video=video)
    return vision_pb2.ImageInput(data=item, max_tiles=max_tiles)


def _anchor(item: VisualItem) -> bytes:
    if isinstance(item, VideoClip):
        return item.frames[0] if item.frames else b""
    return item


async def _serving(server: VisionServer) -> bool:
    try:
        reply = await server.stub.Health(common_pb2.HealthRequest(), timeout=2.0)
    except grpc.aio.AioRpcError:
        return False
    return reply.status == common_pb2.HealthResponse.STATUS_SERVING


class _Progress:
    started = False


class _RetryableError(Exception):
    """The server could not be reached before it sent anything."""


class _Busy(Exception):
    """The server refused the request (RESOURCE_EXHAUSTED): its queue is full."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


def _from_call_error(exc: CallFailed, address: str) -> Exception:
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"vision server {address} went away: {exc.details}")
    if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(exc.details or "invalid image")
    return DvdError(f"vision server {address}: {exc.details}", code=exc.code)
