"""The marker: the ``.rnp-fast`` file in every folder rnp-fast makes. A marker is a claim, not a
proof, so it records what rnp-fast needs to recognise its files again:

    {"made_by": "rnp-fast", "format": 2, "version": "0.1.0", "kind": "defense run",
     "files": {"summary.json": {"size": 1234, "sha256": "..."}, ...}}

A file counts as rnp-fast's only while its size and SHA-256 still match the marker's record: a
file the user added, edited or replaced is theirs, and a marker that lists a file it does not
match proves nothing about it. A marker that is unreadable, not JSON, not rnp-fast's format, of an
unknown kind, oversized, or that names a path outside its folder is refused outright
(`MarkerError`, exit code 2): rnp-fast then cannot tell its files from the user's, so it touches
none of them. Folders from before markers recorded hashes (format 1) are judged by `old_markers`.

A staging folder (a run being written) has a marker with ``"staging": true`` and the names the run
has started writing (``"writing"``): their content is not final yet, so a killed run's staging
folder is recognised by those names alone (`leftovers`).

A marker is replaced atomically: written whole as ``.rnp-fast.writing`` beside it, then renamed
over it, so a process killed at any moment leaves the previous marker (or none) intact, never an
empty or half one. What such a kill can leave is the ``.rnp-fast.writing`` file, which counts as
rnp-fast's only while it is a plain file holding the beginning of a marker (`is_marker_being_written`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from rnp_fast import __version__
from rnp_fast.outputs.errors import OutputError

MARKER = ".rnp-fast"
MARKER_BEING_WRITTEN = ".rnp-fast.writing"  # renamed over MARKER once complete
MADE_BY = "rnp-fast"
FORMAT = 2  # 1: a list of file names (or nothing) without hashes; see old_markers

DEFENSE_RUN = "defense run"
TRAINED_MODEL = "trained model"
SWEEP_REPORT = "sweep report"
SWEEP_STORE = "sweep store"
KINDS = (DEFENSE_RUN, TRAINED_MODEL, SWEEP_REPORT, SWEEP_STORE)
GROWS_IN_PLACE = (SWEEP_STORE,)  # never replaced as a whole: its command adds to it
OLD_KIND_NAMES = {"run": DEFENSE_RUN, "sweep job": DEFENSE_RUN}  # a sweep job's folder is a defense run

MAX_MARKER_BYTES = 1_000_000  # a marker lists a few files; a bigger one is not ours
SHA256 = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK = 1 << 20


class MarkerError(OutputError):
    """A marker rnp-fast cannot trust: nothing in its folder is touched (exit code 2)."""

    def __init__(self, directory: Path, reason: str):
        super().__init__(
            f"{directory / MARKER} {reason}: rnp-fast cannot tell its files from yours in {directory} and "
            "touches nothing there; choose another output folder (or remove that one yourself)"
        )


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str

    def as_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Marker:
    kind: str | None  # None: an old marker that did not say (old_markers reads it from the files)
    files: Mapping[str, FileRecord] | None = None  # format 2: every file rnp-fast wrote, with its proof
    old_names: frozenset[str] | None = None  # format 1: the file names it listed (None: no list)
    writing: frozenset[str] = field(default_factory=frozenset)  # a staging folder: names being written
    staging: bool = False

    @property
    def is_old(self) -> bool:
        return self.files is None


def record_of(path: Path) -> FileRecord:
    """The size and SHA-256 of the file at ``path`` (read in chunks: models can be large)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size, digest.hexdigest())


def matches(path: Path, record: FileRecord) -> bool:
    """Is the file at ``path`` still the one the record describes? (Size first: no hashing of a
    file that already differs.)"""
    try:
        return path.lstat().st_size == record.size and record_of(path) == record
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def has_marker(directory: Path) -> bool:
    """Whether ``directory`` holds something named like a marker (trusted or not)."""
    return os.path.lexists(directory / MARKER)


def read_marker(directory: Path) -> Marker | None:
    """The marker of ``directory``; None when it has none; `MarkerError` when it has one that
    rnp-fast cannot trust (see the module docstring)."""
    path = directory / MARKER
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not path.is_file():
        raise MarkerError(directory, "is not a file rnp-fast wrote (a link or a folder)")
    try:
        size = path.stat().st_size
        if size > MAX_MARKER_BYTES:
            raise MarkerError(directory, f"is {size:,} bytes, far more than a marker rnp-fast writes")
        record = json.loads(path.read_text(encoding="utf-8"))
    except MarkerError:
        raise
    except OSError as error:
        raise MarkerError(directory, f"cannot be read ({error.strerror or error})") from None
    except (ValueError, RecursionError):
        raise MarkerError(directory, "is damaged (not JSON)") from None
    if not isinstance(record, dict) or record.get("made_by") != MADE_BY:
        raise MarkerError(directory, 'is not an rnp-fast marker (no "made_by": "rnp-fast")')
    return parse_marker(directory, record)


def parse_marker(directory: Path, record: dict) -> Marker:
    version = record.get("format", 1)
    if version == 1 and "format" not in record:
        return parse_old_marker(directory, record)
    if version != FORMAT:
        raise MarkerError(directory, f"has format {version!r}, which this rnp-fast does not know")
    kind = known_kind(directory, record.get("kind"))
    staging = record.get("staging") is True
    files = record.get("files", {})
    writing = record.get("writing", [])
    if not isinstance(files, dict) or not isinstance(writing, list):
        raise MarkerError(directory, "is damaged (its file list is not a list)")
    return Marker(
        kind,
        files={safe_name(directory, name): file_record(directory, name, value) for name, value in files.items()},
        writing=frozenset(safe_name(directory, name) for name in writing),
        staging=staging,
    )


def parse_old_marker(directory: Path, record: dict) -> Marker:
    """A format-1 marker: a kind (or none) and a list of names (or none), without proofs."""
    kind = record.get("kind")
    kind = None if kind is None else known_kind(directory, OLD_KIND_NAMES.get(kind, kind))
    names = record.get("files")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise MarkerError(directory, "is damaged (its file list is not a list of names)")
    return Marker(kind, old_names=None if names is None else frozenset(safe_name(directory, n) for n in names))


def known_kind(directory: Path, kind) -> str:
    if kind not in KINDS:
        shown = repr(kind)[:60]
        raise MarkerError(directory, f"names an unknown kind of folder ({shown})")
    return kind


def safe_name(directory: Path, name) -> str:
    """A listed name must be a plain relative path inside the folder: never absolute, never ``..``."""
    if not isinstance(name, str):
        raise MarkerError(directory, f"lists {repr(name)[:60]}, which is not a file name")
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts or name != "/".join(parts):
        raise MarkerError(directory, f"lists {name[:80]!r}, a path outside its folder or not a plain name")
    if name == MARKER:
        raise MarkerError(directory, "lists itself")
    return name


def file_record(directory: Path, name: str, value) -> FileRecord:
    if (
        isinstance(value, dict)
        and isinstance(value.get("size"), int)
        and value["size"] >= 0
        and isinstance(value.get("sha256"), str)
        and SHA256.fullmatch(value["sha256"])
    ):
        return FileRecord(value["size"], value["sha256"])
    raise MarkerError(directory, f"is damaged (no size and SHA-256 for {name[:80]!r})")


def is_ours(directory: Path) -> bool:
    """Marked by a marker rnp-fast can read (its files still to be proven one by one)."""
    try:
        return read_marker(directory) is not None
    except MarkerError:
        return False


# ------------------------------------------------------------------------------------------------
# Proving: which entries of a folder are rnp-fast's
# ------------------------------------------------------------------------------------------------


def first_unproven(directory: Path, marker: Marker, kind: str | None) -> tuple[str, str] | None:
    """The first entry of ``directory`` (sorted, depth first) that the marker does not prove to be
    rnp-fast's, with the reason; None when every entry is rnp-fast's."""
    from rnp_fast.outputs.old_markers import old_file_is_ours  # format 1: judged by content

    def proven(name: str, path: Path) -> str | None:
        if marker.staging:
            return None if name in marker.writing else "was not written by rnp-fast"
        if marker.is_old:
            return None if old_file_is_ours(marker, kind, name, path) else "was not written by rnp-fast"
        record = marker.files.get(name)
        if record is None:
            return "was not written by rnp-fast"
        return None if matches(path, record) else "changed since rnp-fast wrote it"

    return walk_unproven(directory, "", proven, lambda folder: claims_below(marker, folder))


def walk_unproven(directory: Path, prefix: str, proven, claims_folder) -> tuple[str, str] | None:
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = prefix + entry.name
        if name == MARKER or (name == MARKER_BEING_WRITTEN and is_marker_being_written(Path(entry.path))):
            continue
        if entry.is_symlink():
            return name, "was not written by rnp-fast"  # rnp-fast never makes links
        if entry.is_dir(follow_symlinks=False):
            if not claims_folder(name + "/"):
                return name + "/", "was not written by rnp-fast"
            inner = walk_unproven(Path(entry.path), name + "/", proven, claims_folder)
            if inner is not None:
                return inner
        else:
            reason = proven(name, Path(entry.path))
            if reason is not None:
                return name, reason
    return None


def claims_below(marker: Marker, folder: str) -> bool:
    """Does the marker claim a file inside ``folder`` (written ``name/``)?"""
    names = marker.writing if marker.staging else (marker.old_names if marker.is_old else marker.files)
    return names is not None and any(name.startswith(folder) for name in names)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def files_in(directory: Path) -> list[str]:
    """Every file below ``directory``, as posix paths relative to it (the marker's list)."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in names if name not in (MARKER, MARKER_BEING_WRITTEN))


def mark(directory: Path, kind: str, files: Iterable[str] = ()) -> None:
    """Claim ``directory`` as ours: its kind and, for each of ``files`` (relative names), the
    proof that rnp-fast wrote it."""
    proofs = {name: record_of(directory / name).as_dict() for name in sorted(files)}
    write_marker(directory, {"kind": kind, "files": proofs})


def mark_staging(directory: Path, kind: str, writing: Iterable[str] = ()) -> None:
    """The marker of a run being written: the names it has started writing (content not final)."""
    write_marker(directory, {"kind": kind, "staging": True, "writing": sorted(writing)})


def write_marker(directory: Path, fields: dict) -> None:
    """Replace ``directory``'s marker atomically (see the module docstring)."""
    record = {"made_by": MADE_BY, "format": FORMAT, "version": __version__, **fields}
    pending = directory / MARKER_BEING_WRITTEN
    if os.path.lexists(pending):
        if not is_marker_being_written(pending):
            raise OutputError(f"{pending} was not written by rnp-fast; it touches nothing in {directory}")
        pending.unlink()  # what a killed write of ours left
    # O_EXCL: a file or link made under that name since is never written through
    descriptor = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(marker_text(record))
        os.replace(pending, directory / MARKER)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise


def marker_text(record: dict) -> str:
    from rnp_fast.outputs.results import json_text  # results reads the markers: imported here, not above

    return json_text(record, indent=None)


def is_marker_being_written(path: Path) -> bool:
    """Is ``path`` what a write of a marker killed before its rename leaves: a plain file named
    MARKER_BEING_WRITTEN, no bigger than a marker, holding the beginning of one (possibly nothing)?"""
    head = marker_text({"made_by": MADE_BY, "format": FORMAT})[:-2]  # '{"made_by": "rnp-fast", "format": 2'
    if path.name != MARKER_BEING_WRITTEN:
        return False
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MARKER_BYTES:
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith(head) or head.startswith(text)
