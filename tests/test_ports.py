"""Free loopback ports are picked below the kernel's ephemeral range (dvd/ports.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dvd import ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    picked = ports.free_ports(5)
    assert len(set(picked)) == 5
    low = ports.ephemeral_low()
    if low > ports.LOWEST + ports.TRIES:
        assert all(ports.LOWEST <= port < low for port in picked)
    for port in picked:  # each can be bound by the server started next
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))


def test_without_room_below_the_range_the_kernel_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("1024\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", narrow)
    assert ports.ephemeral_low() == 1024
    assert ports.free_port() >= 1024
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "absent")
    assert ports.ephemeral_low() == 32768
