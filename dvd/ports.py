"""Free loopback ports for servers started next (`dvd up`'s metrics ports, benchmarks, tests).

A port that bind(("127.0.0.1", 0)) hands out comes from the kernel's ephemeral range, the
range outgoing connections draw their local ports from: between picking it and the server's
bind, any process's connect() may take it, and the server then dies with "address already
in use" (seen in CI, where many servers start and connect at once). So ports are picked at
random below that range, where only servers bind, and the kernel's choice is the fallback.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

LOWEST = 10000
"""The lowest port picked (below: well-known and commonly configured services)."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 64


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now (held open together, so no repeats)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            _bind_free(sock, host)
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _bind_free(sock: socket.socket, host: str) -> None:
    top = ephemeral_low()
    picks = random.SystemRandom()
    for _ in range(TRIES if top > LOWEST + TRIES else 0):
        try:
            sock.bind((host, picks.randrange(LOWEST, top)))
            return
        except OSError:
            continue  # in use, or in TIME_WAIT: another one
    sock.bind((host, 0))


def ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (Linux's default where unreadable)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
