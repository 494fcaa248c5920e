"""Everything rnp-fast writes goes through here: it never destroys what it did not make.

Ownership. Every directory rnp-fast makes (a run, a trained model, a report, a sweep store)
holds a small marker file, ``.rnp-fast``; every JSON file it saves carries ``"made_by":
"rnp-fast"``. An output path may be replaced only when it does not exist, is an empty directory,
or is one of ours. Before any work, `vet_output` refuses (exit code 2, one line):

- the empty string, ``/``, the home folder, the current folder and every folder above it;
- a folder that holds a file the command reads (its model, mask file, data, sweep file);
- an existing path that rnp-fast did not make.

Atomic runs. A run directory is written into a hidden staging directory beside the target and
renamed into place only when the run has finished: an interrupted or failed run leaves the
complete previous result or nothing. What a killed run leaves beside the target (its staging
directory, or the previous result moved aside mid-swap) is cleaned up, or put back, by the next
run into the same target, and only when it carries our marker.

Operating-system errors on output (name too long, permission denied, read-only file system, no
space left, busy) become one line naming the path and the reason: exit code 2 before the work,
1 during it; the staging directory is removed and the previous result stays intact.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from rnp_fast import __version__
from rnp_fast.errors import UserError

MARKER = ".rnp-fast"
MADE_BY = "rnp-fast"


class OutputError(UserError):
    """An output path we must not, or cannot, write: exit code 2 before any work, 1 during it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def os_error(path: Path, error: OSError, exit_code: int = 2) -> OutputError:
    reason = error.strerror or type(error).__name__
    return OutputError(f"cannot write {path}: {reason}", exit_code)


# ------------------------------------------------------------------------------------------------
# Vetting an output path before any work
# ------------------------------------------------------------------------------------------------


def vet_output(
    out: str | Path | None, reads: Iterable[str | Path | None] = (), flag: str = "--out", owned=None
) -> Path:
    """The resolved output directory, or a one-line refusal (see the module docstring).
    ``owned(path)`` recognises an existing directory as ours (default: it carries the marker)."""
    target = resolve_output(out, flag)
    refuse_protected(target, flag)
    refuse_holding_inputs(target, reads, flag)
    kind = path_kind(target)
    if kind == "missing":
        refuse_unwritable_parent(target)
    elif kind != "directory":
        raise OutputError(f"{flag} {target} exists and is not a directory")
    elif not ((owned or is_ours)(target) or is_empty(target)):
        raise OutputError(f"{target} exists and was not made by rnp-fast; choose another {flag} or remove it yourself")
    return target


def vet_output_file(out: str | Path | None, reads: Iterable[str | Path | None] = (), flag: str = "--out", owned=None):
    """The resolved path of an output FILE (a JSON result, a .beton), refused like a directory is:
    a directory, or an existing file that ``owned(path)`` does not recognise as ours."""
    target = resolve_output(out, flag)
    refuse_protected(target, flag)
    inputs = {p.resolve() for p in existing(reads)}
    if target in inputs:
        raise OutputError(f"{flag} {target} is a file this command reads; choose another {flag}")
    kind = path_kind(target)
    if kind == "directory":
        raise OutputError(f"{flag} {target} is a directory; give a file name")
    if kind == "missing":
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


def mark(directory: Path, kind: str) -> None:
    """Claim ``directory`` as ours (see the module docstring)."""
    record = {"made_by": MADE_BY, "version": __version__, "kind": kind}
    (directory / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


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
# Writing
# ------------------------------------------------------------------------------------------------


class RunDirectory:
    """``with RunDirectory(out, reads=...) as run: run.write_text(...)``; committed on a clean exit.

    The target is vetted on construction (before any work); ``kind`` names what it holds in the
    marker (a defense run, a trained model, a report)."""

    def __init__(self, target: str | Path, reads: Iterable[str | Path | None] = (), kind: str = "run"):
        self.target = vet_output(target, reads)
        self.kind = kind
        self.staging: Path | None = None

    def __enter__(self) -> RunDirectory:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            clean_up_after_killed_runs(self.target)
            self.staging = Path(tempfile.mkdtemp(prefix=self.prefix("partial"), dir=self.target.parent))
            self.staging.chmod(0o755)  # mkdtemp makes it private; a results directory is not
            mark(self.staging, self.kind)
        except OSError as error:
            self.discard()
            raise os_error(self.target, error) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
                return
            except OSError as error:
                self.discard()
                raise os_error(self.target, error, exit_code=1) from None
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, UserError):
            raise os_error(Path(exc.filename or self.target), exc, exit_code=1) from None

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

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
        """Swap the staging directory into place; the old result is removed only afterwards, and
        only if it is still ours (or empty): something may have appeared there during the run."""
        old = None
        if path_kind(self.target) != "missing":
            if not (self.target.is_dir() and (is_ours(self.target) or is_empty(self.target))):
                raise OutputError(
                    f"{self.target} appeared during the run and was not made by rnp-fast; nothing was "
                    "replaced (choose another --out)",
                    exit_code=1,
                )
            old = Path(tempfile.mkdtemp(prefix=self.prefix("old"), dir=self.target.parent))
            os.replace(self.target, old / "previous")
        os.replace(self.staging, self.target)
        self.staging = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def clean_up_after_killed_runs(target: Path) -> None:
    """Remove what a killed run left beside ``target``: its staging directory, and, if it was killed
    in the middle of swapping in its result, put the previous result back first. Only our own
    leftovers (marked, or empty) are touched."""
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*-*")):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or process_alive(int(pid)):
            continue
        previous = leftover / "previous"
        if kind == "partial" and not (is_ours(leftover) or is_empty(leftover)):
            continue
        if kind == "old" and not (is_empty(leftover) or (previous.is_dir() and is_ours(previous))):
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


def is_our_json(path: Path) -> bool:
    """A JSON result rnp-fast saved (``made_by``; older results: their ``versions.rnp_fast``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("made_by") == MADE_BY or "rnp_fast" in (data.get("versions") or {})


def save_json(data: dict, path: str | Path, flag: str = "--out") -> Path:
    """Write a result file atomically (an interrupted writer never leaves half a JSON file), only
    over a file of ours; the data is stamped ``made_by``."""
    target = vet_output_file(path, flag=flag, owned=is_our_json)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps({"made_by": MADE_BY, **data}, indent=2) + "\n", encoding="utf-8")
        staging.replace(target)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise os_error(target, error, exit_code=1) from None
    return target
