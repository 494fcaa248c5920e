"""Locks between rnp-fast commands: a writer holds its staging directory's lock while it lives, and
the short steps that touch an output's parent hold the parent's; the kernel drops a lock when its
process dies, however it dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None when another holds it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


@contextlib.contextmanager
def locked(directory: Path):
    """Hold ``directory``'s lock (released when the process dies, however it dies)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def live_writer(staging: Path) -> bool:
    """A staging directory whose writer still runs: it holds the directory's lock."""
    try:
        descriptor = try_lock(staging)
    except OSError:
        return False
    if descriptor is None:
        return True
    os.close(descriptor)
    return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
