"""Vetting an output path before any work: what rnp-fast may write, and what it refuses (exit code
2, one line, nothing touched). The rules are in the package docstring and docs/files.md."""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from rnp_fast.outputs.errors import OutputError, os_error
from rnp_fast.outputs.leftovers import is_empty, refuse_live_writer
from rnp_fast.outputs.markers import (
    GROWS_IN_PLACE,
    SWEEP_STORE,
    MarkerError,
    first_unproven,
    has_marker,
    mark,
    read_marker,
)
from rnp_fast.outputs.old_markers import OLD_STORE_FILE, guess_kind

_OWN_FOLDERS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("own_folders", default=())


@contextlib.contextmanager
def writing_inside(*folders: str | Path):
    """The caller is the command of these rnp-fast folders (a sweep of its store, a report of its
    store's ``report/``): it may write inside them."""
    resolved = tuple(Path(folder).resolve() for folder in folders)
    token = _OWN_FOLDERS.set(_OWN_FOLDERS.get() + resolved)
    try:
        yield
    finally:
        _OWN_FOLDERS.reset(token)


def refuse_inside_our_folder(target: Path, flag: str) -> None:
    """No command writes into a folder rnp-fast made, unless it is that folder's own command."""
    for ancestor in target.parents:
        if ancestor in _OWN_FOLDERS.get():
            return
        if is_rnp_fast_folder(ancestor):
            raise OutputError(
                f"{flag} {target} lies inside {ancestor}, {describe_folder(ancestor)}; choose a folder outside it"
            )


def is_rnp_fast_folder(directory: Path) -> bool:
    """Marked (trusted or not), or a sweep store made before stores were marked: never written into."""
    return has_marker(directory) or (directory / OLD_STORE_FILE).is_file()


def describe_folder(directory: Path) -> str:
    try:
        marker = read_marker(directory)
    except MarkerError:
        return "a folder whose rnp-fast marker is damaged"
    kind = guess_kind(directory, marker) if marker is not None else SWEEP_STORE
    return f"a {kind or 'folder'} made by rnp-fast"


def vet_output(
    out: str | Path | None,
    reads: Iterable[str | Path | None] = (),
    flag: str = "--out",
    owned=None,
    kind: str | None = None,
) -> Path:
    """The resolved output directory for a folder of ``kind``, or a one-line refusal (see the module
    docstring). ``owned(path)`` also recognises an unmarked directory as ours (an old sweep store).
    Without a ``kind``, any folder of ours that is replaced as a whole will do."""
    target = resolve_output(out, flag)
    refuse_protected(target, flag)
    refuse_holding_inputs(target, reads, flag)
    status = path_kind(target)
    if status == "missing":
        refuse_unwritable_parent(target)
    elif status != "directory":
        raise OutputError(f"{flag} {target} exists and is not a directory")
    elif not is_empty(target):
        try:
            refuse_unless_replaceable(target, kind, flag, owned)  # first: the line names what the target is
        except OSError as error:  # a folder in it the user made unreadable
            raise os_error(Path(error.filename or target), error) from None
    refuse_inside_our_folder(target, flag)
    refuse_live_writer(target, flag)
    return target


def refuse_unless_replaceable(target: Path, kind: str | None, flag: str, owned=None) -> None:
    """``target`` (a non-empty directory) must be a folder of ``kind`` whose every file the marker
    proves to be rnp-fast's (markers.first_unproven); a damaged marker is refused (MarkerError)."""
    marker = read_marker(target)
    if marker is None:
        if owned is not None and owned(target):
            return
        raise OutputError(f"{target} exists and was not made by rnp-fast; choose another {flag} or remove it yourself")
    if marker.staging:
        raise OutputError(
            f"{flag} {target} is a run rnp-fast was still writing (its marker says so); choose another {flag}"
        )
    found = guess_kind(target, marker)
    if found != (kind or found) or (kind is None and found in GROWS_IN_PLACE):
        what = f"a {found}" if found else "a folder of an unknown kind"
        wanted = f"a {kind}" if kind else "the kind this command writes"
        raise OutputError(f"{flag} {target} is {what} made by rnp-fast, not {wanted}; choose another {flag}")
    if found in GROWS_IN_PLACE:
        return
    unproven = first_unproven(target, marker, found)
    if unproven is not None:
        name, reason = unproven
        raise OutputError(
            f"{target}/{name} {reason}; move your files out of {target} "
            f"(rnp-fast replaces a {found} as a whole) or choose another {flag}"
        )
    refuse_read_only(target, flag)


def refuse_read_only(target: Path, flag: str) -> None:
    """A folder (or file in it) whose owner write permission was removed is kept as it is: the
    user made it read-only (checked on the mode bits, which hold for root too)."""
    for path in [target, *target.iterdir()]:
        if not path.lstat().st_mode & stat.S_IWUSR:
            raise OutputError(
                f"{path} is read-only; rnp-fast leaves it as it is: choose another {flag} "
                f"(or make it writable, chmod -R u+w {target}, to replace it)"
            )


def vet_output_file(out: str | Path | None, reads: Iterable[str | Path | None] = (), flag: str = "--out", owned=None):
    """The resolved path of an output FILE (a JSON result, a .beton), refused like a directory is:
    a directory, a path inside a folder of ours, or an existing file that ``owned(path)`` does not
    recognise as ours."""
    target = resolve_output(out, flag)
    refuse_protected(target, flag)
    inputs = {p.resolve() for p in existing(reads)}
    if target in inputs:
        raise OutputError(f"{flag} {target} is a file this command reads; choose another {flag}")
    refuse_inside_our_folder(target, flag)
    status = path_kind(target)
    if status == "directory":
        raise OutputError(f"{flag} {target} is a directory; give a file name")
    if status == "missing":
        refuse_unwritable_parent(target)
    elif owned is None or not owned(target):
        raise OutputError(f"{target} exists and was not made by rnp-fast; choose another {flag} or remove it yourself")
    return target


def resolve_output(out: str | Path | None, flag: str) -> Path:
    if out is None or not str(out).strip():
        raise OutputError(f"{flag} is empty; give the path of a new folder")
    try:
        return Path(out).expanduser().resolve()
    except (OSError, RuntimeError) as error:
        raise OutputError(f"{flag} {out}: {getattr(error, 'strerror', None) or error}") from None


def refuse_protected(target: Path, flag: str) -> None:
    """Folders that are never an output: the root, the home folder, the current folder and above."""
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor):
        raise OutputError(f"{flag} {target} is the root folder; choose a new folder for the results")
    if target == Path.home().resolve():
        raise OutputError(f"{flag} {target} is your home folder; choose a new folder for the results")
    if target == cwd or target in cwd.parents:
        raise OutputError(f"{flag} {target} is the current folder or one above it; choose a new folder for the results")


def refuse_holding_inputs(target: Path, reads: Iterable[str | Path | None], flag: str) -> None:
    for path in existing(reads):
        resolved = path.resolve()
        if resolved == target or target in resolved.parents:
            raise OutputError(f"{flag} {target} holds {resolved}, which this command reads; choose another {flag}")


def existing(paths: Iterable[str | Path | None]) -> list[Path]:
    found = []
    for path in paths:
        if path is None or not str(path).strip():
            continue
        try:
            if Path(path).expanduser().exists():
                found.append(Path(path).expanduser())
        except OSError:
            continue  # an input that cannot even be stat'ed is reported by whatever reads it
    return found


def path_kind(path: Path) -> str:
    """missing, directory or other; an OS error (e.g. a name too long) is one line, exit 2."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        raise OutputError(f"{path} is not writable: a part of the path is a file, not a folder") from None
    except OSError as error:
        raise os_error(path, error) from None
    return "directory" if stat.S_ISDIR(status.st_mode) else "other"


def refuse_unwritable_parent(target: Path) -> None:
    """The nearest existing ancestor must be a writable folder (root may write anywhere it can)."""
    parent = target.parent
    while path_kind(parent) == "missing":
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{target} is not writable: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: permission denied in {parent}")


def claim_directory(directory: Path, kind: str) -> None:
    """Create ``directory`` (already vetted) if needed and mark it ours: a sweep store, which grows
    in place instead of being replaced."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not has_marker(directory):
            mark(directory, kind)
    except OSError as error:
        raise os_error(directory, error) from None
