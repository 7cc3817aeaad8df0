"""What both sides of the rdma transport share: the limits they must agree on, registrable
buffers, and queue-pair endpoints as RdmaConnect carries them."""

from __future__ import annotations

import ctypes
import mmap

from dvd.transport.rdma.verbs import Endpoint
from dvd.v1 import vision_pb2

MAX_BUFFER_BYTES = 2**32  # the immediate (32 bits) carries a byte offset in the buffer
WRITE_TIMEOUT_S = 10.0  # longest a sender waits for its writes' completions
QUARANTINE_S = 30.0  # longer than WRITE_TIMEOUT_S: no write can land after it


def anonymous_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory for registration, not inherited by forked children (a child
    touching registered pages copy-on-write could leave the NIC writing the wrong copy)."""
    buffer = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_DONTFORK"):
        buffer.madvise(mmap.MADV_DONTFORK)
    return buffer


def buffer_address(buffer: mmap.mmap) -> int:
    """Virtual address of an mmap's first byte (valid while the mmap is open)."""
    view = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(view)
    del view  # release the export, or the mmap could never be closed
    return address


def endpoint_to_wire(endpoint: Endpoint) -> vision_pb2.RdmaEndpoint:
    return vision_pb2.RdmaEndpoint(
        gid=endpoint.gid, qpn=endpoint.qpn, psn=endpoint.psn, lid=endpoint.lid
    )


def endpoint_from_wire(message: vision_pb2.RdmaEndpoint) -> Endpoint:
    endpoint = Endpoint(bytes(message.gid), message.qpn, message.psn, message.lid)
    endpoint.check()
    return endpoint
