"""A single-writer lock on a run directory.

The lock is an ``flock`` on a lock file; the kernel releases it when the holder dies, even
by ``kill -9``, so a crashed writer never blocks the next attempt. The file also records
who holds it (pid, host, since) so a refusal can name the holder. Where ``flock`` is not
supported (some network filesystems), the recorded pid/host decides: a lock whose holder
ran on this host and is no longer alive is stale and taken over.

The lock file is opened with ``O_NOFOLLOW`` and must be a regular file: a link planted at
its name (``RUN/.trainguard.lock -> ~/.bashrc``) would otherwise make every writer
truncate the link's target. Such a path is refused with
:class:`~trainguard.errors.UnsafePath`.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import weakref
from pathlib import Path

from trainguard.errors import LockHeld
from trainguard.store.paths import open_regular

_FLOCK_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
_HELD: weakref.WeakSet = weakref.WeakSet()  # locks this process holds


def _drop_in_child() -> None:
    """A forked child (a DataLoader worker) shares its parent's open lock file, and with
    it the flock: after the parent is killed, its workers would keep the run locked
    until they noticed. The child closes its copy; the parent's lock is untouched."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive, non-blocking lock file.

    Args:
        path: the lock file.
        purpose: what the holder does, for messages ("writer", "gc").
    """

    def __init__(self, path: str | os.PathLike, purpose: str = "writer") -> None:
        self.path = Path(path)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    @staticmethod
    def _holder(fd: int) -> dict:
        """The holder's record, read through our own fd (never by path: no link race)."""
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError, RecursionError):
            return {}
        return record if isinstance(record, dict) else {}

    def _refuse(self, holder: dict) -> LockHeld:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        return LockHeld(
            f"{self.path.parent} is locked by another {holder.get('purpose', 'writer')} "
            f"({who}, since {when}). Only one process may write a run directory; stop that "
            f"process, or if it is gone for good delete {self.path}."
        )

    def acquire(self) -> FileLock:
        """Take the lock or raise :class:`LockHeld` naming the holder."""
        if self._fd is not None:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)  # UnsafePath for a link/FIFO
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._holder(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            if exc.errno not in _FLOCK_UNSUPPORTED:
                os.close(fd)
                raise
            holder = self._holder(fd)  # no flock here: fall back to the pid/host record
            if holder and holder.get("pid") != os.getpid() and not self._stale(holder):
                os.close(fd)
                raise self._refuse(holder) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "purpose": self.purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(self)
        return self

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another host's processes: assume alive
        pid = holder.get("pid")
        return not isinstance(pid, int) or not pid_alive(pid)

    def confirm(self) -> FileLock:
        """Check, right before publishing or deleting, that the lock is still held.

        An flock lasts as long as the fd: nothing can take it from a live holder, so this
        only checks that this object holds it.

        Raises:
            LockHeld: this object does not hold the lock.
        """
        if self._fd is None:
            raise LockHeld(f"{self.path.parent}: this process does not hold the writer lock "
                           f"{self.path}; take it (acquire) before writing")
        return self

    def release(self) -> None:
        """Release the lock (idempotent). The file stays; its flock is what counts."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)

    def __del__(self) -> None:  # a dropped lock object must not hold the run forever
        self.release()

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
