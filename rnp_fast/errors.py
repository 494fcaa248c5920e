"""User-facing errors.

Anything a user can get wrong (a flag, a file, a dataset directory) raises `UserError`. The CLI
prints its message on one line to stderr and exits with code 2, never with a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2
