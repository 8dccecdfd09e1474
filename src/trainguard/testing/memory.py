"""``MemoryStore``: a :class:`~trainguard.store.Store` in a dict, for unit tests.

A checkpoint manager, a ``Run`` or your own code written against ``Store`` runs on it
without a disk::

    store = MemoryStore()
    manager = CheckpointManager(store, keep=keep_last(2))

It keeps the promises every backend keeps (the conformance suite in
:mod:`trainguard.testing.store_conformance` checks them): ``write`` is all-or-nothing (a
stream is read whole before anything is stored, so a producer that fails leaves the old
object), keys are validated by :func:`~trainguard.store.base.check_key`, and it offers
:class:`~trainguard.store.base.ExclusiveCreate` and :class:`~trainguard.store.base.Lockable`
(an in-process writer lock: a second holder gets :class:`~trainguard.errors.LockHeld`).
Everything written is visible at once, so ``commit`` has nothing to do. Reads return
copies: a caller that changes the buffer it got does not change the store.

Nothing outlives the object: two managers share a run only when they share the store.
"""

from __future__ import annotations

import itertools
import threading

from trainguard.errors import LockHeld
from trainguard.store.base import Data, check_key

_NUMBERS = itertools.count(1)


def _as_bytes(data: Data) -> bytes:
    """``data`` (one buffer, or an iterable of buffers) as one ``bytes``."""
    try:
        return memoryview(data).cast("B").tobytes()  # type: ignore[arg-type]
    except TypeError:
        pass
    return b"".join(memoryview(piece).cast("B").tobytes() for piece in data)  # type: ignore[union-attr]


class MemoryStore:
    """A thread-safe, in-memory store (see the module docs).

    Args:
        url: how the store names itself in messages (default ``memory://N``, N counting
            the stores made in this process).
    """

    def __init__(self, url: str | None = None) -> None:
        self._url = url or f"memory://{next(_NUMBERS)}"
        self._objects: dict[str, bytes] = {}
        self._holders: dict[str, MemoryLock] = {}  # lock name -> the lock that holds it
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The store's name (``memory://N`` unless given)."""
        return self._url

    def __repr__(self) -> str:
        return f"MemoryStore({self._url!r})"

    def write(self, key: str, data: Data) -> int:
        """Store ``data`` at ``key``, replacing what was there; returns bytes written."""
        check_key(key)
        payload = _as_bytes(data)  # a failing stream raises here, before anything changes
        with self._lock:
            self._objects[key] = payload
        return len(payload)

    def create(self, key: str, data: Data) -> int:
        """Store ``data`` at ``key`` only if nothing is there.

        Raises:
            FileExistsError: ``key`` exists; it is left as it is.
        """
        check_key(key)
        payload = _as_bytes(data)
        with self._lock:
            if key in self._objects:
                raise FileExistsError(f"{self._url}/{key} exists already; not overwritten")
            self._objects[key] = payload
        return len(payload)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> memoryview:
        """A copy of ``length`` bytes of ``key`` from ``offset`` (to the end when None).

        Raises:
            FileNotFoundError: ``key`` does not exist.
            ValueError: a negative offset or length.
        """
        check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length} for {key!r}")
        payload = self._get(key)
        end = len(payload) if length is None else offset + length
        return memoryview(bytearray(payload[offset:end]))

    def _get(self, key: str) -> bytes:
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise FileNotFoundError(f"{self._url}/{key} does not exist") from None

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes. Raises ``FileNotFoundError`` when missing."""
        check_key(key)
        return len(self._get(key))

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        check_key(key)
        with self._lock:
            return key in self._objects

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (a path prefix: ``d`` holds ``d/x``, not ``de``)."""
        clean = prefix.strip("/")
        if clean:
            check_key(clean)
        with self._lock:
            keys = list(self._objects)
        if not clean:
            return sorted(keys)
        return sorted(k for k in keys if k == clean or k.startswith(clean + "/"))

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def commit(self) -> None:
        """Nothing to do: every write is visible (and as durable as it gets) at once."""

    def lock(self, name: str, purpose: str = "writer") -> MemoryLock:
        """The writer lock called ``name`` (not taken yet); see :class:`MemoryLock`."""
        return MemoryLock(self, check_key(name), purpose)


class MemoryLock:
    """An in-process writer lock of a :class:`MemoryStore`: one holder per name.

    Taking it again through the same object is a no-op; through another object (another
    manager of the same store) it raises :class:`~trainguard.errors.LockHeld` until the
    holder releases it.

    Args:
        store: the store whose lock this is.
        name: the lock's name.
        purpose: what the holder does, for messages ("writer", "gc").
    """

    def __init__(self, store: MemoryStore, name: str, purpose: str = "writer") -> None:
        self.store, self.name, self.purpose = store, name, purpose

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        with self.store._lock:
            return self.store._holders.get(self.name) is self

    def acquire(self) -> MemoryLock:
        """Take the lock.

        Raises:
            LockHeld: another lock object holds it (the message names its purpose).
        """
        with self.store._lock:
            holder = self.store._holders.setdefault(self.name, self)
        if holder is not self:
            raise LockHeld(f"{self.store.url}/{self.name} is locked by another "
                           f"{holder.purpose} in this process; only one may write the run. "
                           f"Release that lock (or close its manager) first.")
        return self

    def confirm(self) -> MemoryLock:
        """Check this object still holds the lock.

        Raises:
            LockHeld: it does not (never taken, or released).
        """
        if not self.held:
            raise LockHeld(f"{self.store.url}/{self.name}: this {self.purpose} does not hold "
                           f"the lock; take it (acquire) before writing")
        return self

    def release(self) -> None:
        """Give the lock up; releasing a lock not held is not an error."""
        with self.store._lock:
            if self.store._holders.get(self.name) is self:
                del self.store._holders[self.name]

    def __enter__(self) -> MemoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
