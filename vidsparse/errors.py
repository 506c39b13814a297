"""Exceptions shared by the library and the command line."""

from __future__ import annotations

# Exit statuses of the command line: 2 as argparse uses for usage errors, 130 = 128 + SIGINT as
# shells report a Ctrl-C.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error caused by the command line itself (bad value, missing file): no traceback."""


def brief(exc: BaseException, lines: int = 2) -> str:
    """The first meaningful lines of an exception message, on one line (for wrapped errors)."""
    parts = [ln.strip().rstrip(":.") for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(parts[:lines])


__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "UserError", "brief"]
