"""Progress of a sweep: a bar over jobs (with ETA) on a terminal, one line per event in the log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

LOG_FILE = "sweep.log"


class SweepLog:
    """``STORE/sweep.log``, appended to by every run of the sweep, so it tells the store's history."""

    def __init__(self, directory: Path, total: int, quiet: bool = False):
        self.handle = open(directory / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.quiet = quiet
        # A bar only on a terminal: in CI and in logs the per-job lines say the same.
        disable = quiet or not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="sweep", unit="job", disable=disable, file=sys.stderr, dynamic_ncols=True)

    def info(self, message: str) -> None:
        """A line in the log file and, unless quiet, on the terminal (above the bar)."""
        line = self.detail(message)
        if not self.quiet:
            tqdm.write(line, file=sys.stderr)

    def detail(self, message: str) -> str:
        """A line (or block, e.g. a traceback) for the log file only."""
        line = f"[{time.strftime('%Y/%m/%d %H:%M:%S')}] {message}"
        self.handle.write(line + "\n")
        self.handle.flush()
        return line

    def job_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.handle.close()
