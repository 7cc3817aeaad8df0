"""The tcp transport: control over gRPC, feature bytes over a plain TCP socket.

The language server (Receiver) listens on one data port. Per request it takes one
preallocated buffer per image, sized for the most rows an image can have, and registers
them under 16 random bytes, the token. The vision server (Sender) writes the rows of each
`chunks()` call as one frame (wire.py: header with token, image, byte offset, length; then
the raw bytes) on a persistent connection, then yields the FeatureChunks, of at most
max_chunk_bytes each, whose `written` says which bytes of the image's buffer hold their
rows. A reader thread per connection checks each header against the token's buffers and
lets the kernel copy the payload straight into the buffer slice (recv_into with
MSG_WAITALL: no intermediate copy). `settle()` then waits, without blocking the event loop,
until every byte range the stream announced has landed; frames may land before or after
the chunks that announce them, and one frame may hold many chunks.

Why a frame per call rather than per chunk: a Python reader takes the GIL twice per frame,
and in a language server whose event loop keeps the GIL busy each take can cost up to the
5 ms switch interval. Measured here (2 shared, noisy cores, loopback, sender in another
process, 4 and 13 tiles of 256 x 4096 bf16, medians of 30 alternating rounds, time from
asking the sender to settle() returning), as a fraction of a plain socket read into a
preallocated buffer: with an idle receiving process 0.63-1.01 (mostly 0.8-0.9) for a frame
per call against 0.65-0.85 for a frame per 2 MiB chunk; with a busy Python thread beside
the receiver 0.8-2.3 (the plain recv_into loop waits for the GIL too) against 0.6-0.93.

Only a connection that presents a live token can write, and only inside that token's
buffers (offsets and lengths are checked, in whole rows). A frame outside the buffers fails
its request and closes the connection; a frame with an unknown token closes the
connection; a frame for a recently released token is read and dropped (late bytes). The
token is a capability, not encryption: without TLS, run the data port on a trusted network.
With TLS (dvd.tls; the language server's --tls-cert/--tls-key/--tls-ca), the data port is a
TLS listener, mutual with a CA: a sender must present a certificate the CA signed, and
checks the listener's (wire.py: the handshake and its ACCEPTED byte). Frames then travel
as TLS records of at most 16 KiB, each read and decrypted by Python's ssl module: slower
than the plaintext path's one recv per frame.

Where the sender writes. The vision server iterates `Emission.achunks()`, which hands each
frame to a worker thread (blocking `sendmsg`, GIL released) and yields its chunks once the
frame is out, so the event loop serves other requests meanwhile (a 0.5 ms asyncio ticker
beside the sender saw gaps of 1-3 ms median, 4-11 ms max, against 10-33 ms when the loop
itself sent 13 tiles). Chunks are never announced before their bytes are out: `done`
follows the last chunk, so a failed send ends the call with an error rather than a settle
timeout. The plain `chunks()` generator sends on the calling thread, for callers without
an event loop. Sender(max_frame_bytes=) cuts large images into several frames. A receiver
that stops reading is bounded by the send timeout (SO_SNDTIMEO, 10 s).

Failures: a receiver that cannot be reached, or whose connection breaks twice in a row,
makes `chunks()` raise ConnectionError; ValueError is kept for a bad destination or rows
that do not fit, which are the caller's fault.

Received buffers are reused: a released request's buffers go back to a free list (up to
`pool_bytes`) once no reader is writing into them; fresh pages cost a receiver about a
third of its throughput in page faults (1.4-1.6 against 2.2-2.4 GiB/s here).

Files: receiver.py (the language server's side), sender.py (the vision server's side),
wire.py (the frame format, socket helpers, the sender's connection pool).
"""

from dvd.transport.tcp.receiver import Receiver, TcpReception
from dvd.transport.tcp.sender import Sender, TcpEmission

__all__ = [
    "Receiver",
    "Sender",
    "TcpEmission",
    "TcpReception",
]
