"""A benchmark's time budget, and work run in a child process that is killed whole at its cap.

The budget counts from when the work began for whoever waits on it: a wrapper script that
installs first exports the epoch second it started in ``RNP_PROBE_T0``; without it, the process's
own start (imports included). A deadline is never an exception raised inside the work: torch.compile
wraps any exception raised while it compiles (``InternalTorchDynamoError``), and an ``except
Exception`` anywhere below would swallow it. Work that may compile runs in a child process of its
own session instead; at its cap the whole process group gets SIGKILL, which nothing can catch or
wrap, and the next piece of work starts in a fresh process that nothing half-compiled can poison.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rnp_fast.errors import UserError

T0_VARIABLE = "RNP_PROBE_T0"
IMPORTED_AT = time.time()  # the fallback where /proc cannot tell the process's start


def process_started_at() -> float:
    """The epoch second this process started (Linux: /proc; elsewhere: when this module was imported)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime (field 22): clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line[:5] == "btime")
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORTED_AT
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def clock_start(variable: str = T0_VARIABLE) -> float:
    """The epoch second the budget counts from: ``$variable`` when set, else the process's start."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return process_started_at()
    try:
        return float(value)
    except ValueError:
        raise UserError(f"${variable} must be epoch seconds (date +%s), got {value!r}") from None


@dataclass(frozen=True)
class Budget:
    total_s: float
    started_at: float  # epoch seconds

    def spent(self) -> float:
        return time.time() - self.started_at

    def left(self) -> float:
        return self.total_s - self.spent()

    def deadline(self) -> float:
        """The epoch second the budget ends (a child process checks it between units of work)."""
        return self.started_at + self.total_s


@dataclass(frozen=True)
class ChildOutcome:
    returncode: int | None  # None: killed at its cap
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_capped(command: list[str], cap_s: float, poll_s: float = 5.0, on_poll=None, **popen) -> ChildOutcome:
    """Run ``command`` as the leader of a new process group and wait at most ``cap_s`` seconds;
    past that, SIGKILL the whole group (compile workers, test runners and all). ``on_poll`` is
    called every ``poll_s`` seconds while it runs (e.g. to copy its partial results)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        while (left := cap_s - (time.perf_counter() - started)) > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return ChildOutcome(process.wait(timeout=min(poll_s, left)), time.perf_counter() - started)
            if on_poll:
                on_poll()
        return ChildOutcome(None, time.perf_counter() - started)
    finally:
        kill_group(process)  # at the cap, and on any way out of here (Ctrl-C included): nothing left behind


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the leader's pid is the group's id
    process.wait()
