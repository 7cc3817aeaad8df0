"""The few RDMA verbs the rdma transport uses, behind a small interface, and pyverbs under it.

The transport talks to `VerbsDevice`, `QueuePair` and `MemoryRegion` only. `open_device()` gives
the real implementation over pyverbs; tests inject the in-process FAKE of fake_verbs.py.
pyverbs is imported inside this module's functions, only when a device is opened: it ships
with the distribution's rdma-core (Debian/Ubuntu: `apt install python3-pyverbs`, which pip
cannot replace), and a host without an RDMA device, or whose kernel lacks InfiniBand
support, has nothing to open. Both cases raise `RdmaUnavailable` and say which it was.

What is used, and nothing else:
- a device, opened by name or the first one listed, with one protection domain;
- memory registration with local write, plus remote write for buffers peers write into;
- reliable-connection (RC) queue pairs, each with its own completion queue, moved
  RESET -> INIT when created and INIT -> RTR -> RTS with the peer's GID, QPN, PSN (and LID);
- RDMA WRITE WITH IMMEDIATE: the bytes land in the peer's memory and one of the peer's
  posted receive work requests completes, carrying the 32-bit immediate value;
- posting receive work requests, and polling a completion queue without blocking.
"""

from __future__ import annotations

import enum
import secrets
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

GID_BYTES = 16
PSN_BITS = 24
MAX_IMMEDIATE = 2**32 - 1


class RdmaUnavailable(RuntimeError):
    """pyverbs cannot be imported, or there is no RDMA device to open."""


class VerbsError(RuntimeError):
    """A verb failed: registration, queue-pair creation or transition, posting, polling."""


class WcStatus(enum.IntEnum):
    """Work completion status (`enum ibv_wc_status`); the values are the libibverbs ABI."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


@dataclass(frozen=True)
class Endpoint:
    """One side of an RC queue pair, as the other side needs it to connect."""

    gid: bytes  # 16 bytes; on RoCE the port's GID at the chosen index
    qpn: int
    psn: int  # the first packet sequence number this side sends (24 bits)
    lid: int = 0  # InfiniBand local identifier; 0 on RoCE

    def check(self) -> None:
        """ValueError when the endpoint cannot be connected to."""
        if len(self.gid) != GID_BYTES:
            raise ValueError(f"endpoint gid has {len(self.gid)} bytes, not {GID_BYTES}")
        if not 0 < self.qpn < 2**24:
            raise ValueError(f"endpoint qpn {self.qpn} is not a queue pair number")
        if not 0 <= self.psn < 2**PSN_BITS:
            raise ValueError(f"endpoint psn {self.psn} does not fit in {PSN_BITS} bits")
        if not 0 <= self.lid < 2**16:
            raise ValueError(f"endpoint lid {self.lid} does not fit in 16 bits")


@dataclass(frozen=True)
class Completion:
    """A polled work completion."""

    wr_id: int
    status: int
    imm: int | None = None  # the immediate value (host order) of an incoming write with imm
    byte_len: int = 0  # bytes written, for an incoming write with immediate

    @property
    def ok(self) -> bool:
        return self.status == WcStatus.SUCCESS

    def describe(self) -> str:
        try:
            name = WcStatus(self.status).name
        except ValueError:
            name = "UNKNOWN"
        return f"work request {self.wr_id}: status {self.status} ({name})"


def random_psn() -> int:
    return secrets.randbits(PSN_BITS)


class MemoryRegion(ABC):
    """Registered memory: `address` is the first byte's virtual address in this process."""

    address: int
    length: int
    lkey: int
    rkey: int

    @abstractmethod
    def close(self) -> None:
        """Deregisters; the memory itself belongs to the caller and stays."""


class QueuePair(ABC):
    """A reliable-connection queue pair with its own completion queue (sends and receives)."""

    @property
    @abstractmethod
    def endpoint(self) -> Endpoint:
        """This side, for the peer's connect()."""

    @abstractmethod
    def connect(self, remote: Endpoint) -> None:
        """INIT -> RTR -> RTS towards `remote`; VerbsError when the device refuses."""

    @abstractmethod
    def post_receive(self, wr_id: int) -> None:
        """Posts one receive work request; an incoming write with immediate consumes it."""

    @abstractmethod
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
        """Posts a signaled RDMA WRITE WITH IMMEDIATE of `length` bytes from
        local.address + local_offset to remote_addr (in the peer's region `rkey`)."""

    @abstractmethod
    def poll(self, max_entries: int) -> list[Completion]:
        """Up to max_entries completions, without blocking (an empty list when none)."""

    @abstractmethod
    def close(self) -> None:
        """Destroys the queue pair and its completion queue; idempotent."""


class VerbsDevice(ABC):
    """An opened device with one protection domain."""

    name: str

    @abstractmethod
    def register(self, address: int, length: int, remote_write: bool) -> MemoryRegion:
        """Registers [address, address + length) with local write access (and remote write)."""

    @abstractmethod
    def create_qp(self, send_depth: int, recv_depth: int) -> QueuePair:
        """A new RC queue pair in INIT, taking at most these many outstanding work requests."""

    @abstractmethod
    def close(self) -> None:
        """Closes the device; queue pairs and regions should be closed first."""


class DeviceOpener(Protocol):
    def __call__(self, name: str | None = None, gid_index: int = 0, port: int = 1) -> VerbsDevice:
        """Opens `name` (the first device when None); RdmaUnavailable when there is none."""
        ...


def gid_from_text(text: str) -> bytes:
    """pyverbs writes GIDs as 'fe80:0000:...:0001' (eight groups of four hex digits)."""
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != GID_BYTES:
        raise ValueError(f"{text!r} is not a GID")
    return raw


def gid_to_text(gid: bytes) -> str:
    hexa = gid.hex()
    return ":".join(hexa[i : i + 4] for i in range(0, len(hexa), 4))


# --- the pyverbs implementation --------------------------------------------------------


_NO_PYVERBS = (
    "the rdma transport needs pyverbs, which this Python cannot import ({error}). It comes "
    "with rdma-core, not from pip: on Debian/Ubuntu `apt install python3-pyverbs rdma-core "
    "ibverbs-providers` installs it for the system python3 under /usr/lib/python3/dist-packages "
    "(a virtual environment sees it only when created with --system-site-packages or given a "
    ".pth file naming that folder)"
)
_NO_DEVICE = (
    "the rdma transport found no RDMA device ({error}). It needs an RDMA NIC (InfiniBand or "
    "RoCE) or soft-RoCE (`rdma link add rxe0 type rxe netdev <interface>`), a kernel with "
    "InfiniBand support and its provider library; `ibv_devices` lists what libibverbs sees"
)


def open_device(name: str | None = None, gid_index: int = 0, port: int = 1) -> VerbsDevice:
    """Opens a real device through pyverbs (the first one listed when `name` is None)."""
    try:
        import pyverbs.device as pv_device
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError as exc:
        raise RdmaUnavailable(_NO_PYVERBS.format(error=exc)) from None
    try:
        names = [d.name.decode() for d in pv_device.get_device_list()]
    except PyverbsError as exc:
        raise RdmaUnavailable(_NO_DEVICE.format(error=exc)) from None
    if not names:
        raise RdmaUnavailable(_NO_DEVICE.format(error="the device list is empty"))
    chosen = name or names[0]
    if chosen not in names:
        raise RdmaUnavailable(f"RDMA device {chosen!r} does not exist; devices: {', '.join(names)}")
    try:
        return PyverbsDevice(chosen, gid_index, port)
    except (PyverbsError, VerbsError) as exc:
        raise RdmaUnavailable(f"cannot open RDMA device {chosen!r}: {exc}") from None


class _PyverbsRegion(MemoryRegion):
    def __init__(self, mr: Any, address: int, length: int) -> None:
        self.mr = mr
        self.address = address
        self.length = length
        self.lkey = mr.lkey
        self.rkey = mr.rkey

    def close(self) -> None:
        self.mr.close()


class _PyverbsQueuePair(QueuePair):
    def __init__(self, device: PyverbsDevice, send_depth: int, recv_depth: int) -> None:
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        self.device = device
        send_depth, recv_depth = max(1, send_depth), max(1, recv_depth)
        self.cq = CQ(device.context, send_depth + recv_depth, None, None, 0)
        cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1)
        self.qp = QP(device.pd, init)
        attr = QPAttr(port_num=device.port)
        attr.pkey_index = 0
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.qp.to_init(attr)
        self._endpoint = Endpoint(device.gid, self.qp.qp_num, random_psn(), device.lid)
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def connect(self, remote: Endpoint) -> None:
        import pyverbs.enums as e
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.pyverbs_error import PyverbsError
        from pyverbs.qp import QPAttr

        self._check_open()
        remote.check()
        attr = QPAttr(port_num=self.device.port, path_mtu=self.device.mtu)
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.max_dest_rd_atomic = 1
        attr.min_rnr_timer = 12  # 0.64 ms before a sender retries when no receive is posted
        is_global = 1 if remote.gid != bytes(GID_BYTES) else 0
        route = GlobalRoute(dgid=GID(gid_to_text(remote.gid)), sgid_index=self.device.gid_index)
        attr.ah_attr = AHAttr(
            dlid=remote.lid, is_global=is_global, port_num=self.device.port, gr=route
        )
        attr.timeout = 14  # 4.096 us * 2^14 = 67 ms per transport retry
        attr.retry_cnt = 7
        attr.rnr_retry = 7  # 7 = retry for as long as the receiver has no receive posted
        attr.sq_psn = self._endpoint.psn
        attr.max_rd_atomic = 1
        try:
            self.qp.to_rtr(attr)
            self.qp.to_rts(attr)
        except PyverbsError as exc:
            raise VerbsError(f"cannot connect queue pair {self._endpoint.qpn}: {exc}") from None
        if self.qp.qp_state != e.IBV_QPS_RTS:
            raise VerbsError(f"queue pair {self._endpoint.qpn} did not reach RTS")

    def _check_open(self) -> None:
        if self._closed:  # pyverbs would dereference a freed queue pair
            raise VerbsError(f"queue pair {self._endpoint.qpn} is closed")

    def post_receive(self, wr_id: int) -> None:
        from pyverbs.pyverbs_error import PyverbsError
        from pyverbs.wr import SGE, RecvWR

        self._check_open()
        scratch = self.device.scratch
        sge = SGE(scratch.address, scratch.length, scratch.lkey)
        try:
            self.qp.post_recv(RecvWR(wr_id=wr_id, num_sge=1, sg=[sge]))
        except PyverbsError as exc:
            raise VerbsError(f"cannot post a receive: {exc}") from None

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
        import pyverbs.enums as e
        from pyverbs.pyverbs_error import PyverbsError
        from pyverbs.wr import SGE, SendWR

        self._check_open()
        if not 0 <= imm <= MAX_IMMEDIATE:
            raise ValueError(f"immediate {imm} does not fit in 32 bits")
        sge = SGE(local.address + local_offset, length, local.lkey)
        wr = SendWR(
            wr_id=wr_id,
            opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM,
            num_sge=1,
            sg=[sge],
            imm_data=socket.htonl(imm),  # the field is big-endian on the wire
            send_flags=e.IBV_SEND_SIGNALED,
        )
        wr.set_wr_rdma(rkey, remote_addr)
        try:
            self.qp.post_send(wr)
        except PyverbsError as exc:
            raise VerbsError(f"cannot post an RDMA write: {exc}") from None

    def poll(self, max_entries: int) -> list[Completion]:
        import pyverbs.enums as e
        from pyverbs.pyverbs_error import PyverbsError

        self._check_open()
        try:
            _, wcs = self.cq.poll(max_entries)
        except PyverbsError as exc:
            raise VerbsError(f"cannot poll the completion queue: {exc}") from None
        out = []
        for wc in wcs:
            with_imm = wc.status == e.IBV_WC_SUCCESS and wc.wc_flags & e.IBV_WC_WITH_IMM
            out.append(
                Completion(
                    wr_id=wc.wr_id,
                    status=wc.status,
                    imm=socket.ntohl(wc.imm_data) if with_imm else None,
                    byte_len=wc.byte_len,
                )
            )
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.qp.close()
            self.cq.close()


class PyverbsDevice(VerbsDevice):
    """A real device: context, protection domain, port attributes, GID at `gid_index`."""

    SCRATCH_BYTES = 64  # receive work requests need one SGE; writes with imm never fill it

    def __init__(self, name: str, gid_index: int, port: int) -> None:
        import pyverbs.enums as e
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD

        self.name = name
        self.port = port
        self.gid_index = gid_index
        self.context = Context(name=name)
        port_attr = self.context.query_port(port)
        if port_attr.state != e.IBV_PORT_ACTIVE:
            self.context.close()
            raise VerbsError(f"port {port} of {name} is not active (state {port_attr.state})")
        self.mtu = port_attr.active_mtu
        self.lid = port_attr.lid
        self.gid = gid_from_text(str(self.context.query_gid(port, gid_index)))
        self.pd = PD(self.context)
        mr = MR(self.pd, self.SCRATCH_BYTES, e.IBV_ACCESS_LOCAL_WRITE)  # pyverbs owns its buffer
        self.scratch = _PyverbsRegion(mr, mr.buf, self.SCRATCH_BYTES)

    def register(self, address: int, length: int, remote_write: bool) -> MemoryRegion:
        import pyverbs.enums as e
        from pyverbs.mr import MR
        from pyverbs.pyverbs_error import PyverbsError

        access = e.IBV_ACCESS_LOCAL_WRITE
        if remote_write:
            access |= e.IBV_ACCESS_REMOTE_WRITE
        try:
            mr = MR(self.pd, length, access, address=address)
        except PyverbsError as exc:
            raise VerbsError(
                f"cannot register {length} bytes on {self.name}: {exc} (registered memory "
                "is pinned: RLIMIT_MEMLOCK, `ulimit -l`, must allow it; in a container "
                "`--ulimit memlock=-1`)"
            ) from None
        return _PyverbsRegion(mr, address, length)

    def create_qp(self, send_depth: int, recv_depth: int) -> QueuePair:
        from pyverbs.pyverbs_error import PyverbsError

        try:
            return _PyverbsQueuePair(self, send_depth, recv_depth)
        except PyverbsError as exc:
            raise VerbsError(f"cannot create a queue pair on {self.name}: {exc}") from None

    def close(self) -> None:
        self.scratch.close()
        self.pd.close()
        self.context.close()
