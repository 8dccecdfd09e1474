"""Opening files inside a store without following links or blocking on special files.

trainguard never makes a symbolic link, FIFO, socket or device inside a run directory, so
one found there was planted (or copied in by mistake). Following a link could read or
truncate any file the process may touch; opening a FIFO blocks until a writer comes.
Everything here refuses both with :class:`~trainguard.errors.UnsafePath`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from trainguard.errors import UnsafePath

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# errno of an O_NOFOLLOW open of a link: ELOOP on Linux, EMLINK on some BSDs
_LINK_ERRNOS = {errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP)}


def link_refused(path: Path) -> UnsafePath:
    """The error for a symbolic link found where trainguard reads or writes."""
    return UnsafePath(
        f"{path} is a symbolic link; trainguard never makes links in a run directory and "
        f"does not read or write through one (it could point anywhere). Remove the link "
        f"(or, to keep checkpoints on another disk, point the run directory itself there)")


def special_refused(path: Path, mode: int) -> UnsafePath:
    """The error for a FIFO, socket, device or directory where a file belongs."""
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device or special file")
    return UnsafePath(f"{path} is {kind}, not a regular file; trainguard does not read it. "
                      f"Remove it")


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a link at ``path`` and refuses non-regular files.

    ``O_NONBLOCK`` keeps the open of a FIFO from blocking until its writer comes; on a
    regular file it changes nothing.

    Raises:
        UnsafePath: ``path`` is a link, or not a regular file.
        OSError: the open failed otherwise (``FileNotFoundError`` included).
    """
    try:
        fd = os.open(path, flags | NOFOLLOW | NONBLOCK | CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _LINK_ERRNOS and os.path.islink(path):
            raise link_refused(path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise special_refused(path, info.st_mode)
    return fd
