"""The run's log: timestamped lines like the reference's, to a file and (unless quiet) the terminal."""

from __future__ import annotations

import sys
import time
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
