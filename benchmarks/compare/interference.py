"""Where the machine's CPUs went while a level ran, per process role (Linux /proc).

The systems compared share this machine's CPUs with the load generator and with whatever
else runs on it. `CpuWatch` measures, between `start()` and `stop()`, the CPU seconds of
the CPUs this process may run on (/proc/stat's lines for its affinity set: a container's or
taskset's, which the systems it starts inherit) and of this process and each of its
descendants (the systems it started, their children, and the children those reaped,
counted under the reaper's role), and reports them as the average number of CPUs each role
kept busy (`CpuUse`):

- the roles of the benchmark's own processes (`role_of`: vision server, language server,
  gateway, vLLM's engine, vLLM's API server, the load generator, ...);
- "other processes": the rest of the machine. Zero on a quiet machine; anything near a
  whole CPU on a 2-CPU machine means the figures of that level are not comparable;
- "idle": what nobody used.

CPU time is what the processes took, useful or not: vLLM's processes, for one, busy-poll
for up to a second after each engine step.

Why it is in the report: at a fixed concurrency C (a closed loop), mean latency is
C / throughput, and once "idle" is near zero throughput can only rise if a request costs
fewer CPU-seconds somewhere. The CPU-seconds per request of each role say where.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

LOAD_GENERATOR = "load generator"
OTHER = "other processes"
IDLE = "idle"
ROLES = (
    ("vLLM engine", ("VLLM::EngineCore", "VLLM::Worker")),
    ("vision server", ("dvd vision ",)),
    ("language server", ("dvd language ",)),
    ("gateway", ("dvd gateway ",)),
    ("dvd up", ("dvd up ",)),
    ("vLLM API server", ("vllm.entrypoints", "benchmarks.compare.vllm_native")),
)
"""(role, argv fragments that mark it), first match wins: vLLM names its engine-core and
worker processes VLLM::EngineCore / VLLM::Worker_..., which the dvd language server and
vLLM's own server both start."""
ROLE_ORDER = (LOAD_GENERATOR, *(role for role, _ in ROLES), "other (ours)", OTHER, IDLE)


def role_of(argv: str) -> str:
    """The role of one of the benchmark's processes, from its command line."""
    padded = argv + " "
    for role, marks in ROLES:
        if any(mark in padded for mark in marks):
            return role
    return "other (ours)"


def machine_busy_s(cpus: set[int] | None = None) -> float | None:
    """CPU seconds `cpus` (default: all) spent not idle since boot (None without /proc/stat)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    if cpus is None:
        rows = [lines[0]]
    else:
        rows = [line for line in lines[1:] if line.startswith("cpu") and _cpu_id(line) in cpus]
    busy = 0
    for row in rows:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in row.split()[1:9])
        busy += user + nice + system + irq + softirq + steal
    return busy / _TICKS


def _cpu_id(line: str) -> int | None:
    name = line.split(maxsplit=1)[0]
    return int(name[3:]) if name[3:].isdigit() else None


@dataclass(frozen=True)
class _Process:
    ppid: int
    cpu_s: float
    """Its own CPU seconds and those of the children it reaped."""
    argv: str


def _processes() -> dict[int, _Process]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        found[int(entry.name)] = _Process(
            int(fields[1]), (utime + stime + cutime + cstime) / _TICKS, argv.strip() or name
        )
    return found


def _tree(processes: dict[int, _Process], root: int) -> set[int]:
    members = {root}
    grew = True
    while grew:
        grew = False
        for pid, process in processes.items():
            if process.ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return members & processes.keys()


@dataclass(frozen=True)
class CpuUse:
    """Average CPUs busy per role between start and stop, plus OTHER and IDLE."""

    cpus: int
    """The machine's CPUs (what the averages, IDLE included, add up to)."""
    seconds: float
    by_role: dict[str, float]

    @property
    def other(self) -> float:
        return self.by_role.get(OTHER, 0.0)

    def per_request_s(self, completed: int) -> dict[str, float]:
        """CPU seconds per completed request, per role of the benchmark's processes."""
        if completed <= 0:
            return {}
        return {
            role: cpus * self.seconds / completed
            for role, cpus in self.by_role.items()
            if role not in (OTHER, IDLE)
        }

    def to_json(self) -> dict[str, object]:
        return {"cpus": self.cpus, "seconds": self.seconds, "by_role": dict(self.by_role)}


class CpuWatch:
    """Where the usable CPUs went between start() and stop()."""

    def start(self) -> None:
        from dvd.placement import available_cpus  # the CPUs the systems started inherit

        self._cpus = available_cpus() or None
        self._ours = self._tree()
        self._machine = machine_busy_s(self._cpus)
        self._started = time.monotonic()

    def stop(self) -> CpuUse | None:
        machine = machine_busy_s(self._cpus)
        elapsed = time.monotonic() - self._started
        if machine is None or self._machine is None or elapsed <= 0:
            return None
        now = self._tree()
        used: dict[str, float] = {}
        for pid, process in now.items():
            before = self._ours.get(pid)
            spent = process.cpu_s - (before.cpu_s if before is not None else 0.0)
            role = _role(pid, process)
            used[role] = used.get(role, 0.0) + spent
        for pid, gone in self._ours.items():
            reaper = now.get(gone.ppid)
            if pid not in now and reaper is not None:
                # its reaper's cutime now holds its whole life, of which this much came before
                role = _role(gone.ppid, reaper)
                used[role] = used.get(role, 0.0) - gone.cpu_s
        used = {role: max(0.0, seconds) for role, seconds in used.items()}
        busy = machine - self._machine
        cpus = len(self._cpus) if self._cpus else (os.cpu_count() or 1)
        by_role = {role: seconds / elapsed for role, seconds in used.items() if seconds > 0}
        by_role[OTHER] = max(0.0, busy - sum(used.values())) / elapsed
        by_role[IDLE] = max(0.0, cpus - busy / elapsed)
        return CpuUse(cpus, elapsed, by_role)

    @staticmethod
    def _tree() -> dict[int, _Process]:
        """This process and its descendants now."""
        processes = _processes()
        return {pid: processes[pid] for pid in _tree(processes, os.getpid())}


def _role(pid: int, process: _Process) -> str:
    return LOAD_GENERATOR if pid == os.getpid() else role_of(process.argv)


def wait_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 2.0) -> float | None:
    """Waits (at most `max_wait_s`) until other processes use under `threshold` CPUs over a
    `window_s` window; returns the last window's figure (None without /proc)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        watch = CpuWatch()
        watch.start()
        time.sleep(window_s)
        use = watch.stop()
        other = None if use is None else use.other
        if other is None or other < threshold or time.monotonic() >= deadline:
            return other
