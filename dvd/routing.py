"""Which pool member gets a call: least loaded, or affinity bounded by load.

Affinity is rendezvous (highest-random-weight) hashing: every member scores
hash(key, member address) and the highest score wins, so a key keeps its member while the
pool changes, and a member that joins or leaves moves only the keys it wins or won. A key
here is an image's content hash (vision: a repeated image finds the encoder cache that has
it) or a conversation's leading messages (language: a next turn finds its KV prefix).

Pure affinity would pile a hot key onto one member, so it is bounded ("consistent hashing
with bounded loads", Mirrokni et al.): a member is skipped while its load is above
(1 + epsilon) x the mean load after this call, rounded up; the key then goes to its next
best member. With epsilon 0.25 no member carries more than 1.25x its share.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

M = TypeVar("M")

LEAST_LOADED = "least-loaded"
DEFAULT_EPSILON = 0.25


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
    epsilon: float = DEFAULT_EPSILON,
) -> M:
    """The member `key` hashes to, unless that one is over the load bound."""
    if not members:
        raise ValueError("no member to pick from")
    total = sum(load(m) for m in members) + 1  # this call included
    bound = math.ceil((1 + epsilon) * total / len(members))
    order = rendezvous_order(key, [address(m) for m in members])
    for index in order:
        if load(members[index]) < bound:
            return members[index]
    return members[order[0]]  # unreachable: some member is at or below the mean
