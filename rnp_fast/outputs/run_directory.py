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
from rnp_fast.outputs.leftovers import clean_up_after_killed_runs, is_empty, refuse_live_writer
from rnp_fast.outputs.locks import locked, try_lock
from rnp_fast.outputs.markers import (
    DEFENSE_RUN,
    OLD_KIND_NAMES,
    Marker,
    files_in,
    first_foreign,
    folder_kind,
    mark,
    owned_name,
    read_marker,
)
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
        return self.write_text(name, json_text(data))

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
