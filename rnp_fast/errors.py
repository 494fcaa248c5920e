"""User-facing errors.

Anything a user can get wrong (a flag, a file, a dataset directory) raises `UserError`. The CLI
prints its message on one line to stderr and exits with code 2, never with a traceback.
"""

import re


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2


TERMINAL_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def one_line(message: str) -> str:
    """``message`` as the one plain line the user reads: terminal escapes (colours, bold, cursor
    moves, which third-party messages carry) and other control characters removed, lines joined."""
    text = TERMINAL_ESCAPE.sub("", str(message))
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def run_script(main, name: str) -> None:
    """Run a benchmark script's ``main`` the way the CLI runs a command: a UserError is one line
    on stderr (``NAME: error: ...``) and its exit code, never a traceback."""
    import sys

    try:
        main()
    except UserError as error:
        print(f"{name}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)
