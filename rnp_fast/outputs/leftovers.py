"""What runs leave beside an output: the hidden staging directory of a run being written
(``.NAME.partial-PID-XXXX``) and the previous result set aside while a new one is swapped in
(``.NAME.old-PID-XXXX``, holding ``previous``).

A name is no proof: anyone can make a folder called ``.run.old-1-x``. A killed run's leftover is
removed (or, for a result set aside mid-swap, put back) only when rnp-fast can prove it is its own:
its writer is gone (no lock held, no live process of that pid), and its marker proves every entry
in it (a staging folder: every name is one the run had started writing; a set-aside result: every
file still matches its record). Anything else is left where it is, untouched.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

from rnp_fast.outputs.errors import OutputError
from rnp_fast.outputs.locks import live_writer, process_alive
from rnp_fast.outputs.markers import (
    MarkerError,
    first_unproven,
    has_marker,
    is_marker_being_written,
    read_marker,
)
from rnp_fast.outputs.old_markers import guess_kind

LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^/]+")
PREVIOUS = "previous"  # the set-aside result inside an ``old`` leftover


def leftovers(parent: Path, target: str | None = None):
    """(kind, pid, path) of the staging and set-aside directories in ``parent`` (of ``target`` only,
    when given); links and files with such names are not ours and are skipped."""
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        found = LEFTOVER.fullmatch(entry.name)
        if found and (target is None or found["target"] == target) and entry.is_dir() and not entry.is_symlink():
            yield found["kind"], int(found["pid"]), entry


def refuse_live_writer(target: Path, flag: str = "--out") -> None:
    for kind, pid, leftover in leftovers(target.parent, target.name):
        if kind == "partial" and has_marker(leftover) and live_writer(leftover):
            raise OutputError(
                f"another rnp-fast command (pid {pid}) is writing {target} now; wait for it to finish or "
                f"choose another {flag}"
            )


def clean_up_after_killed_runs(parent: Path, target: str | None = None) -> None:
    """Remove what killed runs left in ``parent`` (beside ``target``, when given), and put back a
    result that a run killed mid-swap had set aside, where its target is missing. Only leftovers
    proven ours (see the module docstring) of writers no longer running are touched."""
    for kind, pid, leftover in leftovers(parent, target):
        if live_writer(leftover) or (pid != os.getpid() and process_alive(pid)):
            continue
        if kind == "partial" and (is_empty(leftover) or proven_ours(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)
        elif kind == "old":
            restore_set_aside(leftover, parent / LEFTOVER.fullmatch(leftover.name)["target"])


def restore_set_aside(leftover: Path, target: Path) -> None:
    entries = [entry.name for entry in leftover.iterdir()]
    previous = leftover / PREVIOUS
    if entries == [PREVIOUS] and previous.is_dir() and not previous.is_symlink() and proven_ours(previous):
        if not os.path.lexists(target):
            os.replace(previous, target)
        shutil.rmtree(leftover, ignore_errors=True)
    elif not entries:
        leftover.rmdir()


def proven_ours(directory: Path) -> bool:
    """Does ``directory``'s marker prove every entry in it (nothing of anyone else's inside)?"""
    try:
        marker = read_marker(directory)
        return marker is not None and first_unproven(directory, marker, guess_kind(directory, marker)) is None
    except (MarkerError, OSError):
        return False


def is_empty(directory: Path) -> bool:
    """Nothing in it, or only what a process killed while writing its first marker left."""
    try:
        entries = list(itertools.islice(directory.iterdir(), 2))
    except OSError:
        return False
    return not entries or (len(entries) == 1 and is_marker_being_written(entries[0]))
