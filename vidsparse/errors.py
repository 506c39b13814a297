"""Exceptions shared by the library and the command line."""

from __future__ import annotations

import errno
import os

# Exit statuses of the command line: 2 as argparse uses for usage errors, 130 = 128 + SIGINT as
# shells report a Ctrl-C.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# The machine ran out of something the run needs (disk space, memory): not the command's fault,
# but a one-line message says what and what to try, as for a usage error.
EXIT_RESOURCE = 1


class UserError(Exception):
    """An error caused by the command line itself (bad value, missing file): no traceback."""


def brief(exc: BaseException, lines: int = 2) -> str:
    """The first meaningful lines of an exception message, on one line (for wrapped errors)."""
    parts = [ln.strip().rstrip(":.") for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(parts[:lines])


_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# Messages of allocators that fail without a MemoryError: torch's CPU allocator ("DefaultCPUAllocator:
# can't allocate memory", "you tried to allocate") and CUDA's ("CUDA out of memory").
_OOM_TEXT = ("can't allocate memory", "you tried to allocate", "out of memory")


def resource_failure(exc: BaseException) -> str | None:
    """What ran out, as one line with what to try, when ``exc`` is a full disk or exhausted memory; else None.

    Checked by name and message, not by importing torch: ``torch.OutOfMemoryError`` and the CPU
    allocator's ``RuntimeError`` both say so in their text.
    """
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        detail = f" ({exc.strerror})" if exc.strerror and exc.strerror != os.strerror(exc.errno) else ""
        return (
            f"{_DISK_ERRNOS[exc.errno]}{where}{detail}. Nothing partial was kept in its place; "
            "free some space or choose an output on another disk, then run again."
        )
    text = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(t in text.lower() for t in _OOM_TEXT)):
        first = brief(exc, 1)[:300] or type(exc).__name__
        return (
            f"out of memory ({first}). Try fewer frames or a smaller height and width, a 16-bit --dtype, "
            "or (generate) --cpu-offload."
        )
    return None


__all__ = ["EXIT_INTERRUPTED", "EXIT_RESOURCE", "EXIT_USER_ERROR", "UserError", "brief", "resource_failure"]
