"""Where a benchmark's CPU time goes: per party (this process, its children, the
local broker), the time spent waiting for a core, and how busy the machine was.
Reads ``/proc`` only; no sessionbus code, so the raw baselines use it too."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.registry import Figure


def _sched(pid: int) -> tuple[float, float]:
    """Seconds a process's threads have run on a CPU and have waited, runnable, for one
    (``/proc/PID/task/*/schedstat``); zeros when it is gone."""
    run = wait = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                ran, waited, _ = (task / "schedstat").read_text().split()
                run += int(ran)
                wait += int(waited)
    return run / 1e9, wait / 1e9


def _machine_busy_seconds() -> float:
    """CPU time every core of the machine spent busy (not idle, not waiting for I/O)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _broker_pid() -> int | None:
    """The local RabbitMQ node's Erlang VM, if it runs on this machine."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "beam.smp":
                return int(entry.name)
    return None


@dataclass(frozen=True)
class CpuUse:
    ran: dict[str, float]  # CPU seconds per party over the window
    waited: dict[str, float]  # seconds runnable but not running (the CPU was taken)
    busy: float  # seconds every core of the machine was busy, whoever used it
    elapsed: float  # the window, wall-clock seconds


class CpuMeter:
    """Where the time goes: CPU used by each party over a window, the time our own
    processes waited for a CPU, and how busy the whole machine was (its 2 cores are
    shared with other work). The broker's figure includes its schedulers' busy-waiting."""

    def __init__(self, parties: dict[str, list[int]], *, bench: bool = True) -> None:
        self.parties = dict(parties)
        if bench:
            self.parties["bench"] = [os.getpid()]
        broker = _broker_pid()
        if broker is not None:
            self.parties["broker"] = [broker]
        self.began = time.perf_counter()
        self.start = self._sample()

    def _sample(self) -> tuple[dict[str, tuple[float, float]], float]:
        parties = {}
        for party, pids in self.parties.items():
            samples = [_sched(p) for p in pids]
            parties[party] = (sum(r for r, _ in samples), sum(w for _, w in samples))
        return parties, _machine_busy_seconds()

    def stop(self) -> CpuUse:
        elapsed = time.perf_counter() - self.began
        (end, busy), (start, busy0) = self._sample(), self.start
        return CpuUse(
            {k: end[k][0] - start[k][0] for k in end},
            {k: end[k][1] - start[k][1] for k in end},
            busy - busy0,
            elapsed,
        )


def cpu_figures(prefix: str, use: CpuUse, count: float, what: str) -> dict[str, Figure]:
    """CPU milliseconds per ``what`` of each party; how long the coordinator was kept
    waiting for a CPU (seconds per second); how busy the machine was."""
    figures = {
        f"{prefix}cpu_ms_per_{what}.{party}": Figure(ran / max(count, 1) * 1000, "ms", None)
        for party, ran in sorted(use.ran.items())
    }
    if "coordinator" in use.waited:
        waited = use.waited["coordinator"] / use.elapsed
        figures[f"{prefix}coordinator_waiting_for_cpu"] = Figure(waited, "s/s", None)
    figures[f"{prefix}machine_busy_cores"] = Figure(use.busy / use.elapsed, "cores", None)
    return figures
