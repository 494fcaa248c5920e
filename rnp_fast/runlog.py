"""The run's log: timestamped lines like the reference's, to a file and (unless quiet) the terminal,
and `Progress`: how far a long pass has got, every few seconds (no stage stays silent for minutes)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm


class RunLog:
    def __init__(self, path: Path | None, quiet: bool = False, keep: bool = False):
        self.handle = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed by close())
        self.quiet = quiet
        # keep: the lines stay in memory too, for a run directory written later (the Python API)
        self.lines: list[str] | None = [] if keep else None

    def info(self, message: str) -> None:
        line = f"[{time.strftime('%Y/%m/%d %H:%M:%S')}] - {message}"
        if self.lines is not None:
            self.lines.append(line)
        if self.handle:
            self.handle.write(line + "\n")
            self.handle.flush()
        if not self.quiet:
            tqdm.write(line, file=sys.stderr)

    def append(self, lines: list[str]) -> None:
        """Lines already stamped (a worker process's log, kept in memory) into the file only."""
        if self.handle:
            self.handle.write("".join(line + "\n" for line in lines))
            self.handle.flush()

    def bar(self, total: int, description: str) -> tqdm:
        # Bars only on a terminal: in logs and CI the timestamped epoch lines say the same.
        disable = self.quiet or not sys.stderr.isatty()
        return tqdm(total=total, desc=description, disable=disable, leave=False, file=sys.stderr, unit="epoch")

    def close(self) -> None:
        if self.handle:
            self.handle.close()
            self.handle = None


class Progress:
    """Log lines for a pass of ``total`` units of work: one when it starts, one at most every
    ``every`` seconds while it runs, one when it ends (``say`` None: silent). Scoring every
    pruning candidate on a loaded CPU takes minutes; the log says it is still going."""

    def __init__(self, say: Callable[[str], None] | None, what: str, total: int, every: float = 15.0):
        self.say, self.what, self.total, self.every = say, what, max(1, total), every
        self.started = self.last = time.perf_counter()
        self.done = 0
        if say is not None:
            say(f"{what} ...")

    def advance(self, units: int = 1) -> None:
        self.done += units
        now = time.perf_counter()
        if self.say is not None and now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.say(f"{self.what}: {self.done / self.total:.0%} ({now - self.started:.0f} s)")

    def finish(self) -> None:
        if self.say is not None:
            self.say(f"{self.what}: done in {time.perf_counter() - self.started:.1f} s")
