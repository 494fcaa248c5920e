"""Output errors: one line naming the path and the reason; exit code 2 before the work, 1 during it."""

from __future__ import annotations

from pathlib import Path

from rnp_fast.errors import UserError


class OutputError(UserError):
    """An output path we must not, or cannot, write: exit code 2 before any work, 1 during it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def os_error(path: Path, error: OSError, exit_code: int = 2) -> OutputError:
    reason = error.strerror or type(error).__name__
    return OutputError(f"cannot write {path}: {reason}", exit_code)
