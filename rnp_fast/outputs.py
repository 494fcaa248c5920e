"""Run directories written atomically.

Everything goes into a hidden staging directory beside the target; only when the run has finished
is it renamed into place (replacing an older result). An interrupted or failed run therefore
leaves either the complete previous result or nothing, never a half-written directory. What a
killed run leaves beside the target (its hidden staging directory, or the previous result moved
aside mid-swap) is cleaned up, or put back, by the next run into the same target.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

from rnp_fast.errors import UserError


class RunDirectory:
    """``with RunDirectory(out) as run: run.write_text(...)``; committed on a clean exit."""

    def __init__(self, target: str | Path):
        self.target = Path(target).expanduser().resolve()
        check_output_path(self.target)
        self.staging: Path | None = None

    def __enter__(self) -> RunDirectory:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_up_after_killed_runs(self.target)
        self.staging = Path(tempfile.mkdtemp(prefix=self.prefix("partial"), dir=self.target.parent))
        self.staging.chmod(0o755)  # mkdtemp makes it private; a results directory is not
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            shutil.rmtree(self.staging, ignore_errors=True)

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
        """Swap the staging directory into place; the old result is removed only afterwards."""
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=self.prefix("old"), dir=self.target.parent))
            os.replace(self.target, old / "previous")
        os.replace(self.staging, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def clean_up_after_killed_runs(target: Path) -> None:
    """Remove what a killed run left beside ``target``: its staging directory, and, if it was killed
    in the middle of swapping in its result, put the previous result back first."""
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*-*")):
        kind, _, rest = leftover.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or process_alive(int(pid)):
            continue
        previous = leftover / "previous"
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


def check_output_path(target: Path) -> None:
    """Fail before any work if the output cannot be created."""
    if target.exists() and not target.is_dir():
        raise UserError(f"output path {target} exists and is not a directory")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output directory {target} is not writable")
