"""Feature transports: how image features get from a vision server to a language server.

A transport has two sides, picked by name from one registry that imports each backend only
when it is chosen (pyverbs is imported only for rdma):

- The **receiver** lives in the language server, which owns the destination memory.
  `FeatureReceiver.open()` prepares one request and returns a `Reception`, whose
  `destination` goes into EncodeRequest (None for grpc: bytes travel in the stream).
- The **sender** lives in the vision server. `FeatureSender.open(request)` checks the
  request's destination and returns an `Emission`, which turns each image's feature rows
  into FeatureChunk messages: with the bytes inside (grpc), or after writing them to the
  destination, carrying only where they went (shm, rdma).

A request's life on the receiving side, a small state machine:

    open() -> OPEN --on_plan(image)--> RECEIVING --on_chunk()*--> complete --features()
      every state --release()--> RELEASED   (always called, also on errors and cancellation)

`on_plan` and `on_chunk` raise ValueError on anything inconsistent (unknown image, rows out
of range, bytes outside the image's region); the language server turns that into an error
for the request, never into a crash.
"""

from __future__ import annotations

import importlib

from dvd.transport.base import (
    Emission,
    FeatureReceiver,
    FeatureSender,
    Reception,
    StaleConnection,
)

_BACKENDS: dict[str, str] = {
    "grpc": "dvd.transport.grpc_stream",
    "shm": "dvd.transport.shm",
    "rdma": "dvd.transport.rdma",
    "tcp": "dvd.transport.tcp",
}
NAMES = tuple(_BACKENDS)
DESTINATION_KINDS = {"shm": "shm", "rdma": "rdma", "tcp": "tcp"}
"""FeatureDestination oneof field -> transport name (grpc has no destination)."""


def _module(name: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(_BACKENDS[name])
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose from {', '.join(NAMES)}") from None


def receiver_class(name: str) -> type[FeatureReceiver]:
    return _module(name).Receiver  # type: ignore[no-any-return]


def sender_class(name: str) -> type[FeatureSender]:
    return _module(name).Sender  # type: ignore[no-any-return]


def parse_names(text: str) -> tuple[str, ...]:
    """ "grpc,shm" -> ("grpc", "shm"); ValueError on unknown names."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if name not in _BACKENDS:
            raise ValueError(f"unknown transport {name!r}; choose from {', '.join(NAMES)}")
    if not names:
        raise ValueError("no transport named")
    return names


__all__ = [
    "NAMES",
    "Emission",
    "FeatureReceiver",
    "FeatureSender",
    "Reception",
    "StaleConnection",
    "parse_names",
    "receiver_class",
    "sender_class",
]
