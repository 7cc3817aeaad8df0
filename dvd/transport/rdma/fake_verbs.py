"""A FAKE of the verbs interface (verbs.py), inside one process. For tests only.

It exists because the machines this project is built and tested on have no RDMA NIC (and
their kernel no InfiniBand support), so the rdma transport cannot run for real there. Nothing
here is RDMA, and nothing measured through it says anything about RDMA performance.

A `FakeFabric` plays the wire: memory regions are registered in a dict keyed by rkey, queue
pairs in one keyed by (GID, QPN). `FABRIC` is the process-wide one that `open_device` uses.
An RDMA write with immediate copies the bytes into the target region at once (one memmove)
and puts a completion with the immediate value on the peer's queue pair, consuming one of its
posted receives. It checks what hardware checks, and fails the way hardware fails:

- the local bytes must lie in a region registered on the same device, else the write
  completes with LOC_PROT_ERR;
- the rkey must name a region registered on the peer's device with remote write access,
  and the bytes must fit inside it, else REM_ACCESS_ERR (nothing is written);
- the peer must be a queue pair connected back to this one, ready to receive, expecting
  this packet sequence number, else RETRY_EXC_ERR (the transport's retries run out);
- posting beyond the send queue's depth, or on a queue pair that is not connected, raises;
- an error completion moves the queue pair to the error state, which flushes its posted
  receives (WR_FLUSH_ERR) and completes every later post with WR_FLUSH_ERR.

A write that finds no receive posted at the peer waits in the fabric until one is posted
(real hardware retries after an RNR NAK, for ever with rnr_retry = 7). What it does not
model: packets, MTU, timing, retries that succeed, the responder side of errors, processes.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import threading
from collections import deque
from dataclasses import dataclass

from dvd.transport.rdma.verbs import (
    GID_BYTES,
    MAX_IMMEDIATE,
    PSN_BITS,
    Completion,
    Endpoint,
    MemoryRegion,
    QueuePair,
    VerbsDevice,
    VerbsError,
    WcStatus,
    random_psn,
)


class FakeQpState(enum.Enum):
    INIT = "init"
    RTS = "rts"  # connected (RTR and RTS are one step here)
    ERROR = "error"
    DESTROYED = "destroyed"


class FakeFabric:
    """The FAKE wire between fake devices: every registered region and every queue pair."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.regions: dict[int, FakeMemoryRegion] = {}
        self.queue_pairs: dict[tuple[bytes, int], FakeQueuePair] = {}
        self._keys = itertools.count(0x1000)
        self._qpns = itertools.count(0x100)
        self._devices = itertools.count(1)
        self.writes = 0  # successful RDMA writes, for tests
        self.errors: list[str] = []  # error completions, described, for tests

    def open_device(self, name: str | None = None, gid_index: int = 0, port: int = 1) -> FakeDevice:
        with self.lock:
            number = next(self._devices)
        return FakeDevice(self, name or f"fake{number}", number)


FABRIC = FakeFabric()
"""The process-wide fake fabric."""


def open_device(name: str | None = None, gid_index: int = 0, port: int = 1) -> FakeDevice:
    """A FAKE device on the process-wide FABRIC (same signature as verbs.open_device)."""
    return FABRIC.open_device(name, gid_index, port)


@dataclass
class FakeMemoryRegion(MemoryRegion):
    device: FakeDevice
    address: int
    length: int
    lkey: int
    rkey: int
    remote_write: bool

    def contains(self, address: int, length: int) -> bool:
        return length >= 0 and self.address <= address and address + length <= self.end

    @property
    def end(self) -> int:
        return self.address + self.length

    def close(self) -> None:
        with self.device.fabric.lock:
            self.device.fabric.regions.pop(self.rkey, None)


class FakeDevice(VerbsDevice):
    """A FAKE device: its GID is fe80::<number>, its regions and queue pairs live in the fabric."""

    def __init__(self, fabric: FakeFabric, name: str, number: int) -> None:
        self.fabric = fabric
        self.name = name
        self.gid = bytes.fromhex("fe80") + number.to_bytes(GID_BYTES - 2, "big")
        self.closed = False

    def register(self, address: int, length: int, remote_write: bool) -> MemoryRegion:
        if address <= 0 or length <= 0:
            raise VerbsError(f"cannot register {length} bytes at {address:#x}")
        with self.fabric.lock:
            key = next(self.fabric._keys)
            region = FakeMemoryRegion(self, address, length, key, key, remote_write)
            self.fabric.regions[key] = region
        return region

    def create_qp(self, send_depth: int, recv_depth: int) -> QueuePair:
        with self.fabric.lock:
            qp = FakeQueuePair(
                self, next(self.fabric._qpns), max(1, send_depth), max(1, recv_depth)
            )
            self.fabric.queue_pairs[(self.gid, qp.qpn)] = qp
        return qp

    def close(self) -> None:
        self.closed = True


class FakeQueuePair(QueuePair):
    """A FAKE RC queue pair; its completion queue is a deque."""

    def __init__(self, device: FakeDevice, qpn: int, send_depth: int, recv_depth: int) -> None:
        self.device = device
        self.fabric = device.fabric
        self.qpn = qpn
        self.send_depth = send_depth
        self.recv_depth = recv_depth
        self.state = FakeQpState.INIT
        self.sq_psn = random_psn()
        self._endpoint = Endpoint(device.gid, qpn, self.sq_psn)
        self.remote: Endpoint | None = None
        self.rq_psn = 0  # the next PSN expected from the peer
        self.receives: deque[int] = deque()
        self.completions: deque[tuple[Completion, bool]] = deque()  # (completion, of a send)
        self.sends_outstanding = 0
        self.waiting: deque[_Write] = deque()  # incoming writes that found no receive posted

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def connect(self, remote: Endpoint) -> None:
        remote.check()
        with self.fabric.lock:
            if self.state is not FakeQpState.INIT:
                raise VerbsError(f"fake queue pair {self.qpn} is {self.state.value}, not init")
            self.remote = remote
            self.rq_psn = remote.psn
            self.state = FakeQpState.RTS

    def post_receive(self, wr_id: int) -> None:
        with self.fabric.lock:
            if self.state is FakeQpState.DESTROYED:
                raise VerbsError(f"fake queue pair {self.qpn} is destroyed")
            if self.state is FakeQpState.ERROR:
                self.completions.append((Completion(wr_id, WcStatus.WR_FLUSH_ERR), False))
                return
            if len(self.receives) >= self.recv_depth:
                raise VerbsError(f"receive queue of fake queue pair {self.qpn} is full")
            self.receives.append(wr_id)
            while self.waiting and self.receives:
                self.waiting.popleft().land()

    def post_write_with_imm(
        self,
        wr_id: int,
        local: MemoryRegion,
        local_offset: int,
        length: int,
        remote_addr: int,
        rkey: int,
        imm: int,
    ) -> None:
        if not 0 <= imm <= MAX_IMMEDIATE:
            raise ValueError(f"immediate {imm} does not fit in 32 bits")
        with self.fabric.lock:
            if self.state in (FakeQpState.INIT, FakeQpState.DESTROYED):
                raise VerbsError(f"cannot post on fake queue pair {self.qpn} in {self.state.value}")
            if self.sends_outstanding >= self.send_depth:
                raise VerbsError(f"send queue of fake queue pair {self.qpn} is full")
            self.sends_outstanding += 1
            if self.state is FakeQpState.ERROR:
                self._complete(wr_id, WcStatus.WR_FLUSH_ERR)
                return
            source = self.fabric.regions.get(local.lkey)
            if (
                source is None
                or source.device is not self.device
                or not source.contains(local.address + local_offset, length)
            ):
                self._fail(wr_id, WcStatus.LOC_PROT_ERR, "local bytes outside their region")
                return
            peer = self._peer()
            if peer is None:
                self._fail(wr_id, WcStatus.RETRY_EXC_ERR, "no peer queue pair answers")
                return
            target = self.fabric.regions.get(rkey)
            if (
                target is None
                or target.device is not peer.device
                or not target.remote_write
                or not target.contains(remote_addr, length)
            ):
                self._fail(wr_id, WcStatus.REM_ACCESS_ERR, "remote range not writable")
                return
            write = _Write(
                self,
                peer,
                wr_id,
                local.lkey,
                local.address + local_offset,
                rkey,
                remote_addr,
                length,
                imm,
            )
            if peer.receives:
                write.land()
            else:
                peer.waiting.append(write)

    def _peer(self) -> FakeQueuePair | None:
        """The connected peer, if it is connected back to us and expects our next PSN."""
        if self.remote is None:
            return None
        peer = self.fabric.queue_pairs.get((self.remote.gid, self.remote.qpn))
        if peer is None or peer.state is not FakeQpState.RTS or peer.remote is None:
            return None
        if (peer.remote.gid, peer.remote.qpn) != (self.device.gid, self.qpn):
            return None
        if peer.rq_psn != self.sq_psn:
            return None
        return peer

    def _complete(self, wr_id: int, status: int) -> None:
        """A completion of one of our sends."""
        self.completions.append((Completion(wr_id, status), True))

    def _fail(self, wr_id: int, status: WcStatus, why: str) -> None:
        self.fabric.errors.append(f"qp {self.qpn}: {status.name}: {why}")
        self._complete(wr_id, status)
        self._to_error()

    def _to_error(self) -> None:
        self.state = FakeQpState.ERROR
        while self.receives:
            flushed = Completion(self.receives.popleft(), WcStatus.WR_FLUSH_ERR)
            self.completions.append((flushed, False))

    def poll(self, max_entries: int) -> list[Completion]:
        with self.fabric.lock:
            if self.state is FakeQpState.DESTROYED:
                raise VerbsError(f"fake queue pair {self.qpn} is destroyed")
            out: list[Completion] = []
            while self.completions and len(out) < max_entries:
                completion, of_send = self.completions.popleft()
                if of_send:
                    self.sends_outstanding -= 1
                out.append(completion)
            return out

    def close(self) -> None:
        with self.fabric.lock:
            if self.state is FakeQpState.DESTROYED:
                return
            self.state = FakeQpState.DESTROYED
            self.fabric.queue_pairs.pop((self.device.gid, self.qpn), None)
            while self.waiting:  # their senders' retries run out
                write = self.waiting.popleft()
                write.source._fail(write.wr_id, WcStatus.RETRY_EXC_ERR, "peer destroyed")


@dataclass
class _Write:
    """An RDMA write with immediate on its way: lands when the peer has a receive posted."""

    source: FakeQueuePair
    peer: FakeQueuePair
    wr_id: int
    lkey: int
    from_address: int
    rkey: int
    to_address: int
    length: int
    imm: int

    def land(self) -> None:
        fabric = self.source.fabric
        if self.source.state is not FakeQpState.RTS:
            return  # the sender's queue pair failed or went away meanwhile: nothing to send
        source = fabric.regions.get(self.lkey)
        if source is None or not source.contains(self.from_address, self.length):
            self.source._fail(self.wr_id, WcStatus.LOC_PROT_ERR, "local region deregistered")
            return
        target = fabric.regions.get(self.rkey)
        if target is None or not target.contains(self.to_address, self.length):
            self.source._fail(self.wr_id, WcStatus.REM_ACCESS_ERR, "remote region deregistered")
            return
        ctypes.memmove(self.to_address, self.from_address, self.length)
        fabric.writes += 1
        self.source.sq_psn = (self.source.sq_psn + 1) % 2**PSN_BITS
        self.peer.rq_psn = (self.peer.rq_psn + 1) % 2**PSN_BITS
        receive = self.peer.receives.popleft()
        self.peer.completions.append(
            (Completion(receive, WcStatus.SUCCESS, imm=self.imm, byte_len=self.length), False)
        )
        self.source._complete(self.wr_id, WcStatus.SUCCESS)
