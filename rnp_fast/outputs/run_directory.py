"""A run directory written atomically: staged beside the target, swapped into place when complete,
so that an interrupted or failed run leaves the complete previous result or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.outputs.errors import OutputError, os_error
from rnp_fast.outputs.leftovers import PREVIOUS, clean_up_after_killed_runs, is_empty, refuse_live_writer
from rnp_fast.outputs.locks import locked, try_lock
from rnp_fast.outputs.markers import (
    DEFENSE_RUN,
    OLD_KIND_NAMES,
    MarkerError,
    files_in,
    first_unproven,
    mark,
    mark_staging,
    read_marker,
)
from rnp_fast.outputs.old_markers import guess_kind
from rnp_fast.outputs.results import json_text
from rnp_fast.outputs.vetting import path_kind, vet_output


class RunDirectory:
    """``with RunDirectory(out, reads=...) as run: run.write_text(...)``; committed on a clean exit.

    The target is vetted on construction (before any work); ``kind`` names what it holds in the
    marker (a defense run, a trained model, a sweep report), with the list of files written."""

    def __init__(self, target: str | Path, reads: Iterable[str | Path | None] = (), kind: str = DEFENSE_RUN):
        self.kind = OLD_KIND_NAMES.get(kind, kind)
        self.target = vet_output(target, reads, kind=self.kind)
        self.staging: Path | None = None
        self.lock: int | None = None
        self.writing: set[str] = set()  # names announced in the staging marker

    def __enter__(self) -> RunDirectory:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            with locked(self.target.parent):
                clean_up_after_killed_runs(self.target.parent, self.target.name)
                refuse_live_writer(self.target)
                self.staging = Path(tempfile.mkdtemp(prefix=self.prefix("partial"), dir=self.target.parent))
                self.lock = try_lock(self.staging)
                self.staging.chmod(0o755)  # mkdtemp makes it private; a results directory is not
                mark_staging(self.staging, self.kind)
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
        """Where to write ``name``; the staging marker records the name first, so that a later run
        can prove a killed run's staging folder holds nothing but rnp-fast's files (leftovers)."""
        if name not in self.writing:
            self.writing.add(name)
            mark_staging(self.staging, self.kind, self.writing)
        return self.staging / name

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        path.write_text(text, encoding="utf-8")
        return path

    def write_json(self, name: str, data) -> Path:
        return self.write_text(name, json_text(data))

    def commit(self) -> None:
        """Record the proof of every file written, then swap the staging directory into place; the
        old result is set aside first and removed only afterwards, and only if its marker still
        proves every file in it (the user may have added or changed some during the run)."""
        mark(self.staging, self.kind, files_in(self.staging))
        with locked(self.target.parent):
            old = None
            if path_kind(self.target) != "missing":
                self.refuse_changed_target()
                old = Path(tempfile.mkdtemp(prefix=self.prefix("old"), dir=self.target.parent))
                os.replace(self.target, old / PREVIOUS)
            os.replace(self.staging, self.target)
        self.staging = None
        self.discard()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def refuse_changed_target(self) -> None:
        """The target as the run found it may have changed since it was vetted: it must still be
        ours, of this kind, its marker proving every file in it."""
        if self.target.is_dir() and is_empty(self.target):
            return
        what = f"{self.target} changed"
        try:
            marker = read_marker(self.target) if self.target.is_dir() else None
        except MarkerError:
            marker = None
        if marker is not None and not marker.staging and guess_kind(self.target, marker) == self.kind:
            unproven = first_unproven(self.target, marker, self.kind)
            if unproven is None:
                return
            what = f"{self.target}/{unproven[0]} appeared or changed"
        raise OutputError(
            f"{what} during the run and was not written by rnp-fast; nothing was replaced (choose another --out)",
            exit_code=1,
        )
