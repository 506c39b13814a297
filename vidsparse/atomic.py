"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

A write goes to a temporary file in the destination directory, is flushed and fsynced, then moved
into place with ``os.replace`` (atomic on POSIX and Windows) and the directory entry is fsynced.
On any error (Ctrl-C included) the temporary file is removed and an existing file at the
destination is left untouched. Shared by video/report output (:mod:`vidsparse.video_io`) and LoRA
training state (:mod:`vidsparse.lora.atomic`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vidsparse.errors import brief


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename in ``directory`` (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; after the block, fsync it and move it over ``dest``.

    The parent directory is created if needed. The temporary name keeps ``dest``'s suffix (writers
    such as ffmpeg pick the container from it) and is hidden (leading dot).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions a normal write would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as exc:
        full = not isinstance(exc, OSError) and isinstance(exc, Exception) and _disk_full(dest.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full:  # writers such as torch.save report a full disk as a RuntimeError about file positions
            raise OSError(errno.ENOSPC, f"{type(exc).__name__}: {brief(exc, 1)}", str(dest)) from exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename != str(dest):
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc  # name the file meant, not its temp file
        raise


def _disk_full(directory: Path) -> bool:
    """Whether the filesystem holding ``directory`` has (almost) no space left for an unprivileged write."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows) or the folder is gone
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (non-JSON values via ``str``) atomically."""
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


__all__ = ["atomic_path", "fsync_dir", "write_json", "write_text"]
