"""How much of the vision servers' encoding was hidden behind LLM decoding.

dvd's gateway puts the language server's stage timings into each response's usage
(`dvd_timings`): durations and wall-clock instants on the language server's clock. Each
request's encode interval starts when its features were asked for plus its decode/tiling
and batcher-queue time, and lasts its ViT time; its decode interval runs from its first to
its last token. Over a run, the union of encode intervals is the vision tier's busy time,
and the part of it during which some other request was decoding was hidden: a coupled
server would have stalled decoding for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Interval = tuple[int, int]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[Interval]) -> int:
    return sum(end - start for start, end in intervals)


def intersection(a: list[Interval], b: list[Interval]) -> int:
    """Total length of the overlap of two unions (each sorted and disjoint)."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, end - start)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def encode_interval(t: Mapping[str, int]) -> Interval | None:
    sent = t.get("vision_sent_unix_ns", 0)
    if not sent or not t.get("encode_ns"):
        return None
    start = sent + t.get("preprocess_ns", 0) + t.get("queue_ns", 0)
    return start, start + t["encode_ns"]


def decode_interval(t: Mapping[str, int]) -> Interval | None:
    first, last = t.get("first_token_unix_ns", 0), t.get("last_token_unix_ns", 0)
    return (first, last) if first and last > first else None


@dataclass(frozen=True)
class Overlap:
    encode_busy_s: float
    decode_busy_s: float
    encode_hidden_s: float

    @property
    def encode_hidden_fraction(self) -> float | None:
        return self.encode_hidden_s / self.encode_busy_s if self.encode_busy_s else None

    def to_json(self) -> dict[str, Any]:
        return {
            "encode_busy_s": self.encode_busy_s,
            "decode_busy_s": self.decode_busy_s,
            "encode_hidden_s": self.encode_hidden_s,
            "encode_hidden_fraction": self.encode_hidden_fraction,
        }


def measure(timings: Iterable[Mapping[str, int]]) -> Overlap | None:
    """None when no request carried dvd timings (another server, or no images)."""
    timings = list(timings)
    encode = union(i for i in map(encode_interval, timings) if i is not None)
    decode = union(i for i in map(decode_interval, timings) if i is not None)
    if not encode:
        return None
    return Overlap(length(encode) / 1e9, length(decode) / 1e9, intersection(encode, decode) / 1e9)
