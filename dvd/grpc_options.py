"""gRPC channel and server options shared by every dvd process.

gRPC's default receive limit is 4 MiB on both ends. Feature chunks are kept well below
MAX_CHUNK_BYTES, but a request carries whole images, so the limit is raised deliberately
and named here once.
"""

from __future__ import annotations

MAX_CHUNK_BYTES = 2 * 1024 * 1024
"""Default size of a feature chunk on the gRPC stream."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest single gRPC message any dvd process sends or accepts (requests carry images)."""

KEEPALIVE_TIME_MS = 30_000
"""How often clients ping an idle connection, to notice a peer that vanished."""

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    # A dns:/// target naming a headless Service resolves to every pod: spread calls over
    # all of them instead of gRPC's default of sticking to the first address.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_timeout_ms", 10_000),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # An EncodeSession stays open while idle, and its client's keepalive pings then come
    # with no data between them. gRPC servers by default take pings more often than every
    # 5 minutes as abuse and answer GOAWAY "too_many_pings", which breaks the session and
    # any call starting on it: accept pings at the clients' interval.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    # And servers ping too: a caller whose host vanished holds its session's calls (and
    # their transport buffers) until the ping goes unanswered, not until TCP gives up.
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
]
