"""Where `dvd up` runs its servers on a CPU host: the CPUs each one gets and its thread count.

Unplaced, the vision server's PyTorch pool and vLLM's OpenMP pool each size themselves to
every CPU of the host and fight over them: vLLM binds its compute threads to fixed CPUs
(all but one, which it keeps for its scheduler and API process), the ViT's threads land on
the same CPUs, and every parallel region then waits for a thread the kernel has descheduled.
Measured on a 2-CPU host (`dvd bench compare --systems vllm,dvd-up`, small preset, c=8,
benchmarks/results/ttft-cpu/): unplaced, dvd's median TTFT was 2.8x vLLM's.

So by default the CPUs this process may use are split in two consecutive blocks: the vision
servers get `VISION_SHARE` of them (split again between replicas), the language server the
rest. Each vision server's PyTorch pool is sized to its block (`OMP_NUM_THREADS`); vLLM's
engine binds its own threads inside the language server's block (one of them kept for its
scheduler when the block has more than one). The gateway is not placed: it mostly waits on
sockets.

`--vision-cpus` / `--language-cpus` replace the split (a tier not named then runs on any
CPU, as before); `--cpu-placement off` turns it off. With --coupled, on a GPU host (the
servers' work is on their devices) or with a single CPU, nothing is pinned; on one CPU
every pool gets one thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

VISION_SHARE = 0.5
"""The vision tier's share of the CPUs. Per request, the ViT and the LLM's prefill and
decode cost about the same CPU time on the small preset at 448-896 px images (stage
timings at concurrency 1: encode 0.37 s, prefill + decode 0.47 s); an even split keeps
either tier from queueing behind the other. Bigger images shift work to the ViT, longer
answers to the LLM: pass --vision-cpus / --language-cpus for such traffic."""
MODES = ("auto", "off")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""What sizes PyTorch's intra-op pool (and the BLAS under it) in a child, read at its start."""


@dataclass(frozen=True)
class Placement:
    """CPUs and thread counts per child name ("vision", "vision-2", "language", ...)."""

    cpus: dict[str, frozenset[int]] = field(default_factory=dict)
    """Children pinned with sched_setaffinity; one not named runs on any CPU."""
    threads: dict[str, int] = field(default_factory=dict)
    """Children whose PyTorch pool `dvd up` sizes (via THREAD_VARIABLES)."""
    how: str = "not placed"

    def env(self, name: str) -> dict[str, str]:
        """Environment variables that size `name`'s thread pools (empty: its defaults)."""
        count = self.threads.get(name)
        return {} if count is None else dict.fromkeys(THREAD_VARIABLES, str(count))

    def describe(self) -> list[str]:
        """One line per child that is placed, for the log at start."""
        lines = []
        for name in sorted(set(self.cpus) | set(self.threads)):
            cpus = self.cpus.get(name)
            where = f"CPUs {format_cpus(cpus)}" if cpus else "any CPU"
            count = self.threads.get(name)
            lines.append(f"{name}: {where}" + (f", {count} threads" if count else ""))
        return lines


def parse_cpus(text: str) -> set[int]:
    """ "0-3,8" -> {0, 1, 2, 3, 8} (taskset's syntax); empty: none."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        try:
            cpus.update(range(int(low), int(high or low) + 1))
        except ValueError:
            raise ValueError(f"CPU list {text!r}: {part!r} is not N or N-M") from None
    return cpus


def format_cpus(cpus: frozenset[int] | set[int] | list[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5"."""
    ordered = sorted(cpus)
    runs: list[str] = []
    start = prev = ordered[0] if ordered else 0
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs) if ordered else ""


def split_consecutive(cpus: set[int] | frozenset[int], parts: int) -> list[frozenset[int]]:
    """Consecutive, nearly equal shares of `cpus`, one per part; no CPUs: no shares."""
    ordered = sorted(cpus)
    if not ordered:
        return [frozenset() for _ in range(parts)]
    if len(ordered) < parts:
        raise ValueError(f"{len(ordered)} CPUs cannot be split among {parts} vision replicas")
    size, extra = divmod(len(ordered), parts)
    shares, begin = [], 0
    for i in range(parts):
        end = begin + size + (1 if i < extra else 0)
        shares.append(frozenset(ordered[begin:end]))
        begin = end
    return shares


def _pinned(
    visions: list[str], vision_cpus: set[int], language_cpus: set[int], how: str
) -> Placement:
    cpus: dict[str, frozenset[int]] = {}
    for name, share in zip(visions, split_consecutive(vision_cpus, len(visions)), strict=True):
        if share:
            cpus[name] = share
    if language_cpus:
        cpus["language"] = frozenset(language_cpus)
    threads = {name: len(share) for name, share in cpus.items() if name != "language"}
    return Placement(cpus, threads, how)


def plan(
    visions: list[str],
    available: set[int],
    *,
    mode: str = "auto",
    vision_cpus: set[int] | None = None,
    language_cpus: set[int] | None = None,
    coupled: bool = False,
    gpu_host: bool = False,
) -> Placement:
    """The placement of `visions` (vision child names) and "language" on `available` CPUs."""
    if mode not in MODES:
        raise ValueError(f"cpu_placement: {mode!r} is not one of {', '.join(MODES)}")
    if vision_cpus or language_cpus:
        return _pinned(visions, vision_cpus or set(), language_cpus or set(), "your CPU lists")
    if mode == "off":
        return Placement(how="off (--cpu-placement off): every server on any CPU")
    if coupled:
        return Placement(how="none: coupled, one server does all the work")
    if gpu_host:
        return Placement(how="none: GPU host, the servers compute on their devices")
    ordered = sorted(available)
    if len(ordered) < 2:
        threads = dict.fromkeys(visions, 1)
        return Placement({}, threads, "one CPU: not pinned, one thread per vision server")
    vision_count = min(max(round(len(ordered) * VISION_SHARE), len(visions)), len(ordered) - 1)
    if vision_count < len(visions):  # more replicas than CPUs to give them: share them all
        return Placement(
            {}, dict.fromkeys(visions, 1), "more vision replicas than CPUs: not pinned"
        )
    how = f"default split of {len(ordered)} CPUs ({VISION_SHARE:.0%} to vision)"
    return _pinned(visions, set(ordered[:vision_count]), set(ordered[vision_count:]), how)


def available_cpus() -> set[int]:
    """The CPUs this process may run on (a container's or taskset's, not the host's)."""
    return set(os.sched_getaffinity(0))
