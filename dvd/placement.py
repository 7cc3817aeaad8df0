"""Where `dvd up` runs its servers on a CPU host: CPUs, thread counts and priority.

Unplaced, the vision server's PyTorch pool and vLLM's OpenMP pool each size themselves to
every CPU of the host: vLLM binds its compute threads to fixed CPUs (all but one, which it
keeps for its scheduler and API process), the ViT's threads land on the same CPUs, and each
slows the other down with no order between them. What a request waits for before its first
token is mostly the ViT (and then its prefill); decoding can wait a little.

So by default, on a CPU host:
- the vision servers may use every CPU this process may use (split between replicas, in
  consecutive shares), with PyTorch pools of that size (`OMP_NUM_THREADS`), so one image
  is encoded on all cores when nothing else runs;
- the language server gets the last `LANGUAGE_SHARE` of the CPUs (vLLM binds its threads
  inside them, keeping one for its scheduler when it has more than one), at a lower CPU
  priority (`LANGUAGE_NICE`): where a ViT and the LLM want the same core, the ViT, which
  every waiting request's first token needs, goes first, and the LLM gets the rest;
- the gateway is neither pinned nor lowered: it is light and on every request's path.

Measured on a 2-CPU host (`dvd bench compare --systems vllm,dvd-up`, small preset, c=8,
448-896 px images; the committed report is benchmarks/results/ttft-cpu/): unplaced, a
half/half split and this placement gave 1.33, 1.31 and 1.66 requests/s and a median TTFT of
4.7, 4.8 and 3.3-4.0 s (a lower language priority than +5 gave no further gain). Sampled
under that load, the ViT's two threads shared one core most of the time while vLLM's
engine held the other; binding them one per core (OMP_PROC_BIND) was worse (1.26 req/s):
the thread on vLLM's core waits for it, and its partner idles at every barrier.

`--vision-cpus` / `--language-cpus` replace the default (a tier not named then runs on any
CPU, at normal priority, as before); `--cpu-placement off` turns it off. With --coupled or
on a host with a GPU (vLLM computes there, and so do the vision servers unless told
otherwise) nothing is placed; with a single CPU nothing is pinned and every vision pool
gets one thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

LANGUAGE_SHARE = 0.5
"""The language server's share of the CPUs (the last ones, rounded down, at least one): 1 of
2 or 3, 2 of 4 or 5. Per request, the ViT and the LLM's prefill and decode cost about the
same CPU time on the small preset with 448-896 px images (one core: 0.47 s of ViT, about
0.5 s of LLM)."""
LANGUAGE_NICE = 5
"""How much lower the language server's CPU priority is (nice; CFS then gives a ViT thread
about three times the LLM's share of a core both want)."""
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
    nice: dict[str, int] = field(default_factory=dict)
    """Children started at a lower CPU priority (their own children inherit it)."""
    how: str = "not placed"

    def env(self, name: str) -> dict[str, str]:
        """Environment variables that size `name`'s thread pools (empty: its defaults)."""
        count = self.threads.get(name)
        return {} if count is None else dict.fromkeys(THREAD_VARIABLES, str(count))

    def describe(self) -> list[str]:
        """One line per child that is placed, for the log at start."""
        lines = []
        for name in sorted(set(self.cpus) | set(self.threads) | set(self.nice)):
            cpus = self.cpus.get(name)
            line = f"{name}: " + (f"CPUs {format_cpus(cpus)}" if cpus else "any CPU")
            if name in self.threads:
                line += f", {self.threads[name]} threads"
            if name in self.nice:
                line += f", nice +{self.nice[name]}"
            lines.append(line)
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
    if parts < 1:
        raise ValueError(f"cannot split CPUs among {parts} vision servers")
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
    visions: list[str],
    vision_cpus: set[int],
    language_cpus: set[int],
    how: str,
    language_nice: int = 0,
) -> Placement:
    cpus: dict[str, frozenset[int]] = {}
    shares = split_consecutive(vision_cpus, len(visions)) if visions else []
    for name, share in zip(visions, shares, strict=True):
        if share:
            cpus[name] = share
    if language_cpus:
        cpus["language"] = frozenset(language_cpus)
    threads = {name: len(share) for name, share in cpus.items() if name != "language"}
    nice = {"language": language_nice} if language_nice else {}
    return Placement(cpus, threads, nice, how)


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
    if coupled and vision_cpus:
        raise ValueError("vision_cpus: no vision server runs with --coupled; use --language-cpus")
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
        return Placement({}, threads, how="one CPU: not pinned, one thread per vision server")
    if len(visions) > len(ordered):  # more replicas than CPUs: they could only share them
        return Placement(
            {}, dict.fromkeys(visions, 1), how="more vision replicas than CPUs: not pinned"
        )
    language_count = max(1, int(len(ordered) * LANGUAGE_SHARE))
    how = (
        f"default for {len(ordered)} CPUs: vision servers on all of them, the language "
        f"server on the last {language_count} at nice +{LANGUAGE_NICE}"
    )
    language = set(ordered[-language_count:])
    return _pinned(visions, set(ordered), language, how, LANGUAGE_NICE)


def available_cpus() -> set[int]:
    """The CPUs this process may run on (a container's or taskset's, not the host's)."""
    return set(os.sched_getaffinity(0))
