"""What runs leave beside an output: the hidden staging directory of a run being written
(``.NAME.partial-PID-XXXX``) and the previous result set aside while a new one is swapped in
(``.NAME.old-PID-XXXX``). A killed run's leftovers are cleaned up, or put back, by the next run
into the same target, and only when they are our own."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from rnp_fast.outputs.errors import OutputError
from rnp_fast.outputs.locks import live_writer, process_alive
from rnp_fast.outputs.markers import is_ours


def leftovers(target: Path):
    """(kind, pid, path) of the hidden staging and set-aside directories beside ``target``."""
    if not target.parent.is_dir():
        return
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*-*")):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and leftover.is_dir() and not leftover.is_symlink():
            yield kind, int(pid), leftover


def refuse_live_writer(target: Path, flag: str = "--out") -> None:
    for kind, pid, leftover in leftovers(target):
        if kind == "partial" and is_ours(leftover) and live_writer(leftover):
            raise OutputError(
                f"another rnp-fast command (pid {pid}) is writing {target} now; wait for it to finish or "
                f"choose another {flag}"
            )


def clean_up_after_killed_runs(target: Path) -> None:
    """Remove what a killed run left beside ``target``: its staging directory, and, if it was killed
    in the middle of swapping in its result, put the previous result back first. Only our own
    leftovers (marked, or empty) of writers no longer running are touched."""
    for kind, pid, leftover in leftovers(target):
        running = live_writer(leftover) or (pid != os.getpid() and process_alive(pid))  # (older writers: no lock)
        if kind == "partial" and (running or not (is_ours(leftover) or is_empty(leftover))):
            continue
        previous = leftover / "previous"
        if kind == "old" and (
            process_alive(pid) or not (is_empty(leftover) or (previous.is_dir() and is_ours(previous)))
        ):
            continue
        if kind == "old" and previous.is_dir() and not target.exists():
            os.replace(previous, target)
        shutil.rmtree(leftover, ignore_errors=True)


def is_empty(directory: Path) -> bool:
    try:
        return next(directory.iterdir(), None) is None
    except OSError:
        return False
