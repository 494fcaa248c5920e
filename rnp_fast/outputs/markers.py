"""The marker: the ``.rnp-fast`` file in every folder rnp-fast makes, saying what the folder is (its
kind) and which files rnp-fast wrote into it; reading it, writing it, and telling the folder's
files apart from the user's."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rnp_fast import __version__

MARKER = ".rnp-fast"
MADE_BY = "rnp-fast"
DEFENSE_RUN = "defense run"
TRAINED_MODEL = "trained model"
SWEEP_REPORT = "sweep report"
SWEEP_STORE = "sweep store"
GROWS_IN_PLACE = (SWEEP_STORE,)  # never replaced as a whole: its command adds to it
OLD_KIND_NAMES = {"run": DEFENSE_RUN, "sweep job": DEFENSE_RUN}  # a sweep job's folder is a defense run
OLD_STORE_FILE = "results.sqlite"  # stores made before stores were marked hold it (sweep.store.DATABASE)

# The files each kind of folder has held since rnp-fast 0.1: what counts as rnp-fast's in a folder
# whose marker predates the recorded file lists. Fixed history, not a list to keep up to date.
OLD_FILES = {
    DEFENSE_RUN: (
        "output.log",
        "mask_values.txt",
        "pruning_by_*.txt",
        "pruning.csv",
        "pruning.png",
        "summary.json",
        "config.json",
        "purified.safetensors",
        "purified.pth",
    ),
    TRAINED_MODEL: ("train.log", "model.safetensors", "model.pth", "summary.json"),
    SWEEP_REPORT: ("results.md", "results.csv", "threshold_*.png"),
}
MAX_MARKER_BYTES = 1_000_000  # a marker lists a few file names; a bigger one is not ours


@dataclass(frozen=True)
class Marker:
    kind: str | None  # None: an old marker, which did not say
    files: frozenset[str] | None  # None: an old marker, which did not list them


def read_marker(directory: Path) -> Marker | None:
    """The marker of ``directory``, or None when it has none (not a folder of ours)."""
    path = directory / MARKER
    try:
        if not path.is_file() or path.is_symlink():
            return None
        if path.stat().st_size > MAX_MARKER_BYTES:
            return Marker(None, None)
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return Marker(None, None)  # ours by name, content unreadable: treated as an old marker
    if not isinstance(record, dict):
        return Marker(None, None)
    kind = record.get("kind")
    kind = OLD_KIND_NAMES.get(kind, kind) if isinstance(kind, str) else None
    files = record.get("files")
    listed = frozenset(f for f in files if isinstance(f, str)) if isinstance(files, list) else None
    return Marker(kind, listed)


def folder_kind(directory: Path, marker: Marker) -> str | None:
    """The recorded kind, or for an old marker the kind its contents show (None: cannot tell)."""
    if marker.kind is not None:
        return marker.kind
    if (directory / OLD_STORE_FILE).is_file():
        return SWEEP_STORE
    if (directory / "model.safetensors").is_file() and (directory / "train.log").is_file():
        return TRAINED_MODEL
    if (directory / "results.md").is_file():
        return SWEEP_REPORT
    if (directory / "summary.json").is_file() or (directory / "mask_values.txt").is_file():
        return DEFENSE_RUN
    return None


def is_rnp_fast_folder(directory: Path) -> bool:
    """Marked as ours, or a sweep store made before stores were marked."""
    return (directory / MARKER).is_file() or (directory / OLD_STORE_FILE).is_file()


def is_ours(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def written_by_us(marker: Marker, kind: str | None, name: str) -> bool:
    """Is ``name`` (relative to the folder) a file rnp-fast wrote there?"""
    if name == MARKER:
        return True
    if marker.files is not None:
        return name in marker.files
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OLD_FILES.get(kind, ()))


def owned_name(marker: Marker, kind: str | None, name: str) -> bool:
    """Is ``name`` (a file, or a folder written ``name/``) rnp-fast's in a folder with ``marker``?"""
    if name.endswith("/"):
        return listed_below(marker.files, name)
    return written_by_us(marker, kind, name)


def first_foreign(directory: Path, is_ours) -> str | None:
    """The first entry (sorted, depth first) that ``is_ours(relative name)`` does not claim: a
    user's file, folder or link; a folder of ours counts as ours when a claimed file lies in it."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = Path(entry.path).relative_to(directory).as_posix()
        if entry.is_symlink():
            return name  # rnp-fast never makes links
        if entry.is_dir(follow_symlinks=False):
            if not is_ours(name + "/"):
                return name + "/"
            inner = first_foreign(Path(entry.path), lambda rest, prefix=name: is_ours(f"{prefix}/{rest}"))
            if inner is not None:
                return f"{name}/{inner}"
        elif not is_ours(name):
            return name
    return None


def listed_below(files: frozenset[str] | None, folder: str) -> bool:
    return files is not None and any(f.startswith(folder) for f in files)


def files_in(directory: Path) -> list[str]:
    """Every file below ``directory``, as posix paths relative to it (the marker's list)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def mark(directory: Path, kind: str, files: Iterable[str] | None = None) -> None:
    """Claim ``directory`` as ours (see the module docstring)."""
    record = {"made_by": MADE_BY, "version": __version__, "kind": kind}
    if files is not None:
        record["files"] = sorted(files)
    from rnp_fast.outputs.results import json_text  # results reads the markers: imported here, not above

    (directory / MARKER).write_text(json_text(record, indent=None), encoding="utf-8")
