"""The rdma transport: the vision server RDMA-writes features into the language server's memory.

The protocol, and who does what:

- The language server (Receiver) registers one receive buffer (remote write access) and gives
  each request one region per image, first fit; when the buffer is full a request travels
  over grpc instead.
- Before a vision server's first request, `Receiver.attach` creates a reliable-connection
  queue pair and calls RdmaConnect with its endpoint (GID, QPN, PSN, LID) under a connection
  id it picks; the vision server (Sender.connect) creates its own queue pair and answers with
  its endpoint; both move INIT -> RTR -> RTS. The receiver keeps receive work requests posted.
- A request's RdmaDestination names the connection, the buffer's address and rkey, and each
  image's region (offset and capacity in the buffer).
- The sender copies each run of rows into a registered staging buffer and RDMA-writes it
  WITH IMMEDIATE, in chunks of at most max_chunk_bytes, to address + region offset +
  first_row * row_bytes. The immediate is the chunk's byte offset in the buffer (hence
  buffers of at most 4 GiB). Once the writes completed, the Encode stream carries one
  FeatureChunk per chunk whose `written` says where its rows went, and no feature bytes.
- The receiver pairs each announced chunk with the receive completion carrying its offset;
  `settle` waits for all of them, and features() then views the buffer in place.
- Failures degrade rather than fail requests: when a queue pair breaks, the sender puts the
  rows into the stream instead (grpc style), the receiver copies them into the region, sends
  the next requests over grpc and sets up a new queue pair in the background (RdmaConnect
  with the same connection id replaces the vision server's side).
- A region released before its request settled may still be written by a late RDMA write,
  so it is held back for QUARANTINE_S before it is handed out again.

Files: receiver.py (the language server's side), sender.py (the vision server's side),
common.py (limits both sides agree on, buffers, endpoints on the wire), verbs.py (the verbs
interface over pyverbs, imported only when a device is opened), fake_verbs.py (tests).
"""

from dvd.transport.rdma.common import buffer_address, endpoint_from_wire, endpoint_to_wire
from dvd.transport.rdma.receiver import RECV_DEPTH, RdmaReception, Receiver
from dvd.transport.rdma.sender import RdmaEmission, Sender, UnknownConnection

__all__ = [
    "RECV_DEPTH",
    "RdmaEmission",
    "RdmaReception",
    "Receiver",
    "Sender",
    "UnknownConnection",
    "buffer_address",
    "endpoint_from_wire",
    "endpoint_to_wire",
]
