"""How much CPU the rest of the machine took while a level ran (Linux /proc).

The systems compared share this machine's CPUs with whatever else runs on it. `CpuWatch`
measures, between `start()` and `stop()`, the CPU seconds of the whole machine
(/proc/stat) and of this process and all its descendants (the systems it started and their
children, with the children they reaped), and reports the difference as the average
number of CPUs other processes kept busy. Zero on a quiet machine; anything near a whole
CPU on a 2-CPU machine means the figures of that level are not comparable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """CPU seconds all CPUs spent not idle since boot (None without /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of it and of the children it reaped)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        found[int(entry.name)] = (ppid, (utime + stime + cutime + cstime) / _TICKS)
    return found


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds of `root` (default: this process) and every descendant alive now."""
    processes = _processes()
    members = {root if root is not None else os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in processes.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sum(processes[pid][1] for pid in members if pid in processes)


class CpuWatch:
    """Average CPUs that processes outside this benchmark used between start and stop."""

    def start(self) -> None:
        self._machine = machine_busy_s()
        self._ours = tree_cpu_s()
        self._started = time.monotonic()

    def stop(self) -> float | None:
        machine = machine_busy_s()
        if machine is None or self._machine is None:
            return None
        elapsed = time.monotonic() - self._started
        ours = tree_cpu_s() - self._ours
        other = (machine - self._machine) - ours
        return max(0.0, other) / elapsed if elapsed > 0 else None


def wait_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 2.0) -> float | None:
    """Waits (at most `max_wait_s`) until other processes use under `threshold` CPUs over a
    `window_s` window; returns the last window's figure (None without /proc)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        watch = CpuWatch()
        watch.start()
        time.sleep(window_s)
        other = watch.stop()
        if other is None or other < threshold or time.monotonic() >= deadline:
            return other
