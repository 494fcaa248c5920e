"""Everything rnp-fast writes goes through here: it never destroys what it did not make.

Ownership. Every directory rnp-fast makes holds a small marker file, ``.rnp-fast``, recording the
directory's kind (a defense run, a trained model, a sweep report, a sweep store) and the files
rnp-fast wrote into it; every JSON file it saves carries ``"made_by": "rnp-fast"`` (and its kind).
Before any work, `vet_output` refuses (exit code 2, one line, nothing touched):

- the empty string, ``/``, the home folder, the current folder and every folder above it;
- a folder that holds a file the command reads (its model, mask file, data, sweep file);
- a path inside a folder rnp-fast made (a sweep store, a run, ...), unless the command is that
  folder's own (a sweep writing its jobs and models, ``report`` writing ``STORE/report``);
- an existing path that rnp-fast did not make, or that it made as another kind of folder;
- a folder of the right kind that holds anything rnp-fast did not write there (the user's notes,
  plots, links): the first such file is named, and the user moves it out; rnp-fast replaces a
  folder only as a whole, so it never carries, and never deletes, a file of the user's;
- a folder whose write permission the user removed, and one another rnp-fast command is writing.

Markers written before kinds and file lists were recorded (``{"made_by": "rnp-fast"}``, or a kind
without ``files``) still count as ours: the kind is the recorded one or is read from what the folder
holds, and the files that count as rnp-fast's are the names that kind of folder has always had
(``OLD_FILES``); anything else in it is the user's.

Atomic runs. A run directory is written into a hidden staging directory beside the target and
renamed into place only when the run has finished: an interrupted or failed run leaves the
complete previous result or nothing. A writer holds a lock on its staging directory while it
lives, and the short steps that touch the target's parent (cleaning up, committing) hold a lock on
the parent, so two commands racing into one target never interleave: the second is refused. What a
killed run leaves beside the target (its staging directory, or the previous result moved aside
mid-swap) is cleaned up, or put back, by the next run into the same target, and only when it
carries our marker.

Operating-system errors on output (name too long, permission denied, read-only file system, no
space left, busy) become one line naming the path and the reason: exit code 2 before the work,
1 during it; the staging directory is removed and the previous result stays intact.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import fnmatch
import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rnp_fast import __version__
from rnp_fast.errors import UserError

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
MAX_JSON_BYTES = 64_000_000  # a result file of ours is small; a bigger one is not read to find out


class OutputError(UserError):
    """An output path we must not, or cannot, write: exit code 2 before any work, 1 during it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def os_error(path: Path, error: OSError, exit_code: int = 2) -> OutputError:
    reason = error.strerror or type(error).__name__
    return OutputError(f"cannot write {path}: {reason}", exit_code)


# ------------------------------------------------------------------------------------------------
# Markers: what a folder of ours is, and which of its files are ours
# ------------------------------------------------------------------------------------------------


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


def written_by_us(marker: Marker, kind: str | None, name: str) -> bool:
    """Is ``name`` (relative to the folder) a file rnp-fast wrote there?"""
    if name == MARKER:
        return True
    if marker.files is not None:
        return name in marker.files
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OLD_FILES.get(kind, ()))


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
    (directory / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Writing inside a folder of ours: only its own command does
# ------------------------------------------------------------------------------------------------

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
            marker = read_marker(ancestor) or Marker(None, None)
            kind = folder_kind(ancestor, marker) or "folder made by rnp-fast"
            raise OutputError(
                f"{flag} {target} lies inside {ancestor}, a {kind} made by rnp-fast; choose a folder outside it"
            )


# ------------------------------------------------------------------------------------------------
# Vetting an output path before any work
# ------------------------------------------------------------------------------------------------


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
    """``target`` (a non-empty directory) must be a folder of ``kind`` holding only rnp-fast's files."""
    marker = read_marker(target)
    if marker is None:
        if owned is not None and owned(target):
            return
        raise OutputError(f"{target} exists and was not made by rnp-fast; choose another {flag} or remove it yourself")
    found = folder_kind(target, marker)
    if found != (kind or found) or (kind is None and found in GROWS_IN_PLACE):
        what = f"a {found}" if found else "a folder of an unknown kind"
        wanted = f"a {kind}" if kind else "the kind this command writes"
        raise OutputError(f"{flag} {target} is {what} made by rnp-fast, not {wanted}; choose another {flag}")
    if found in GROWS_IN_PLACE:
        return
    foreign = first_foreign(target, lambda name: owned_name(marker, found, name))
    if foreign is not None:
        raise OutputError(
            f"{target}/{foreign} was not written by rnp-fast; move your files out of {target} "
            f"(rnp-fast replaces a {found} as a whole) or choose another {flag}"
        )
    refuse_read_only(target, flag)


def owned_name(marker: Marker, kind: str | None, name: str) -> bool:
    """Is ``name`` (a file, or a folder written ``name/``) rnp-fast's in a folder with ``marker``?"""
    if name.endswith("/"):
        return listed_below(marker.files, name)
    return written_by_us(marker, kind, name)


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


def is_ours(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def is_empty(directory: Path) -> bool:
    try:
        return next(directory.iterdir(), None) is None
    except OSError:
        return False


def claim_directory(directory: Path, kind: str) -> None:
    """Create ``directory`` (already vetted) if needed and mark it ours: a sweep store, which grows
    in place instead of being replaced."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not is_ours(directory):
            mark(directory, kind)
    except OSError as error:
        raise os_error(directory, error) from None


# ------------------------------------------------------------------------------------------------
# Concurrent writers: locks on the staging directory (while a writer lives) and on the parent
# ------------------------------------------------------------------------------------------------


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


def leftovers(target: Path):
    """(kind, pid, path) of the hidden staging and set-aside directories beside ``target``."""
    if not target.parent.is_dir():
        return
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*-*")):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and leftover.is_dir() and not leftover.is_symlink():
            yield kind, int(pid), leftover


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


def refuse_live_writer(target: Path, flag: str = "--out") -> None:
    for kind, pid, leftover in leftovers(target):
        if kind == "partial" and is_ours(leftover) and live_writer(leftover):
            raise OutputError(
                f"another rnp-fast command (pid {pid}) is writing {target} now; wait for it to finish or "
                f"choose another {flag}"
            )


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


class RunDirectory:
    """``with RunDirectory(out, reads=...) as run: run.write_text(...)``; committed on a clean exit.

    The target is vetted on construction (before any work); ``kind`` names what it holds in the
    marker (a defense run, a trained model, a sweep report), with the list of files written."""

    def __init__(self, target: str | Path, reads: Iterable[str | Path | None] = (), kind: str = DEFENSE_RUN):
        self.kind = OLD_KIND_NAMES.get(kind, kind)
        self.target = vet_output(target, reads, kind=self.kind)
        self.staging: Path | None = None
        self.lock: int | None = None

    def __enter__(self) -> RunDirectory:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            with locked(self.target.parent):
                clean_up_after_killed_runs(self.target)
                refuse_live_writer(self.target)
                self.staging = Path(tempfile.mkdtemp(prefix=self.prefix("partial"), dir=self.target.parent))
                self.lock = try_lock(self.staging)
                self.staging.chmod(0o755)  # mkdtemp makes it private; a results directory is not
                mark(self.staging, self.kind)
        except OSError as error:
            self.discard()
            raise os_error(self.target, error) from None
        except BaseException:
            self.discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
                return
            except OSError as error:
                self.discard()
                raise os_error(self.target, error, exit_code=1) from None
            except BaseException:
                self.discard()
                raise
        failed = self.as_target_path(exc.filename) if isinstance(exc, OSError) else self.target
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, UserError):
            raise os_error(failed, exc, exit_code=1) from None

    def as_target_path(self, filename) -> Path:
        """A file being written in the staging directory, named where the user will look for it."""
        if not filename or self.staging is None:
            return self.target
        path = Path(filename)
        return self.target / path.relative_to(self.staging) if path.is_relative_to(self.staging) else path

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def prefix(self, kind: str) -> str:
        """Hidden sibling names carry the writer's pid, so a later run can tell a killed one's leftovers."""
        return f".{self.target.name}.{kind}-{os.getpid()}-"

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        path.write_text(text, encoding="utf-8")
        return path

    def write_json(self, name: str, data) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def commit(self) -> None:
        """Record the files written, then swap the staging directory into place; the old result
        is removed only afterwards, and only if it still holds nothing but rnp-fast's files (the
        user may have added some during the run)."""
        written = files_in(self.staging)
        mark(self.staging, self.kind, written)
        with locked(self.target.parent):
            old = None
            if path_kind(self.target) != "missing":
                self.refuse_changed_target(written)
                old = Path(tempfile.mkdtemp(prefix=self.prefix("old"), dir=self.target.parent))
                os.replace(self.target, old / "previous")
            os.replace(self.staging, self.target)
        self.staging = None
        self.discard()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def refuse_changed_target(self, written: list[str]) -> None:
        """The target as the run found it may have changed since it was vetted: it must still be
        ours, of this kind, holding nothing but files rnp-fast wrote there or writes now."""
        if self.target.is_dir() and is_empty(self.target):
            return
        marker = read_marker(self.target) if self.target.is_dir() else None
        if marker is not None and folder_kind(self.target, marker) == self.kind:
            again = Marker(self.kind, frozenset(written))
            foreign = first_foreign(
                self.target, lambda name: owned_name(again, self.kind, name) or owned_name(marker, self.kind, name)
            )
            if foreign is None:
                return
            what = f"{self.target}/{foreign} appeared"
        else:
            what = f"{self.target} changed"
        raise OutputError(
            f"{what} during the run and was not written by rnp-fast; nothing was replaced (choose another --out)",
            exit_code=1,
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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------
# JSON result files
# ------------------------------------------------------------------------------------------------


def read_small_json(path: Path, limit: int = MAX_JSON_BYTES):
    """The JSON value in ``path``, or None when it is not JSON, too big to be ours, or too deep."""
    try:
        if path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def is_our_json(path: Path) -> bool:
    """A JSON result rnp-fast saved (``made_by``; older results: their ``versions.rnp_fast``)."""
    data = read_small_json(path)
    if not isinstance(data, dict):
        return False
    versions = data.get("versions")
    return data.get("made_by") == MADE_BY or (isinstance(versions, dict) and "rnp_fast" in versions)


def json_kind(path: Path) -> str | None:
    data = read_small_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def refuse_other_json_kind(target: Path, kind: str | None, flag: str) -> None:
    """A JSON result of ours records its kind (a bench result, a probe result): one of another kind
    is not replaced. Results saved before kinds were recorded may be."""
    found = json_kind(target) if kind is not None and target.is_file() else None
    if found not in (None, kind):
        raise OutputError(f"{flag} {target} is a {found} made by rnp-fast, not a {kind}; choose another {flag}")


def save_json(data: dict, path: str | Path, flag: str = "--out", kind: str | None = None) -> Path:
    """Write a result file atomically (an interrupted writer never leaves half a JSON file), only
    over a file of ours (of the same ``kind``); the data is stamped ``made_by`` (and ``kind``)."""
    target = vet_output_file(path, flag=flag, owned=is_our_json)
    refuse_other_json_kind(target, kind, flag)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    stamp = {"made_by": MADE_BY, **({"kind": kind} if kind else {})}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps({**stamp, **data}, indent=2) + "\n", encoding="utf-8")
        staging.replace(target)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise os_error(target, error, exit_code=1) from None
    return target
