"""Which pool member gets a call: least loaded, or affinity bounded by load.

Affinity is rendezvous (highest-random-weight) hashing: every member scores
hash(key, member address) and the highest score wins, so a key keeps its member while the
pool changes, and a member that joins or leaves moves only the keys it wins or won. A key
here is an image's content hash (vision: a repeated image finds the encoder cache that has
it) or a conversation's leading messages (language: a next turn finds its KV prefix).

Pure affinity would pile a hot key onto one member, so it is bounded by load: a member is
passed over while it is `slack` or more calls ahead of the least loaded member, and the key
goes to its next best member (the least loaded one always qualifies). The bound is additive,
not a multiple of the mean load ("consistent hashing with bounded loads", Mirrokni et al.):
with a few calls in flight on two members, a 1.25x bound spills a quarter of the repeats,
and each spill costs a full ViT encode, while a few calls queued on one member mostly share
its next ViT batch.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

M = TypeVar("M")

LEAST_LOADED = "least-loaded"
CACHE_AFFINE = "cache-affine"
VISION_ROUTINGS = (CACHE_AFFINE, LEAST_LOADED)
"""How a language server picks a vision server: by its first image's hash (bounded by
load), or the least loaded."""
DEFAULT_SLACK = 4
"""How many calls a member may be ahead of the least loaded one and still get its keys."""


class LeastLoaded:
    """The member with the least load; ties go round robin so idle pools spread calls."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, members: Sequence[M], load: Callable[[M], int]) -> M:
        if not members:
            raise ValueError("no member to pick from")
        start = next(self._turn) % len(members)
        rotated = [*members[start:], *members[:start]]
        return min(rotated, key=load)


def rendezvous_order(key: bytes, addresses: Sequence[str]) -> list[int]:
    """Indexes of `addresses` from the highest rendezvous score for `key` to the lowest."""
    scores = [
        hashlib.blake2b(key + b"\0" + address.encode(), digest_size=8).digest()
        for address in addresses
    ]
    return sorted(range(len(addresses)), key=lambda i: scores[i], reverse=True)


def bounded_affinity(
    members: Sequence[M],
    key: bytes,
    address: Callable[[M], str],
    load: Callable[[M], int],
    slack: int = DEFAULT_SLACK,
) -> M:
    """The member `key` hashes to, unless that one is `slack` calls ahead of the least
    loaded; then the next in the key's order that is not."""
    if not members:
        raise ValueError("no member to pick from")
    if slack < 1:
        raise ValueError(f"slack must be at least 1, not {slack}")
    bound = min(load(m) for m in members) + slack
    order = rendezvous_order(key, [address(m) for m in members])
    return next(members[i] for i in order if load(members[i]) < bound)
