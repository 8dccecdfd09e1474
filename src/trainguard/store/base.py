"""The storage boundary: a small protocol on string keys.

Keys are ``/``-separated relative paths (``checkpoints/step-000000100/manifest.json``).
They are strings, not :class:`pathlib.Path`, so that later backends addressed by URL
(``s3://bucket/prefix``) are not mangled. Every backend is tested by the same
conformance suite (:mod:`trainguard.testing.store_conformance`), which checks these
semantics and the contract of each optional capability a backend offers.

Semantics every backend guarantees:

* ``write`` of one key is all-or-nothing: a reader sees the old object, nothing, or the
  whole new object, never a prefix of it.
* ``commit`` makes everything written so far durable and visible to other readers.
  Callers that publish (the checkpoint manifest) call it right after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

#: Anything ``memoryview()`` accepts: bytes, bytearray, mmap, numpy arrays.
Buffer = bytes | bytearray | memoryview
#: One buffer, or an iterable of buffers written back to back (a stream).
Data = Buffer | Iterable[Buffer]


def check_key(key: str) -> str:
    """Validate a store key and return it.

    Args:
        key: a ``/``-separated relative path.

    Returns:
        The key, unchanged.

    Raises:
        ValueError: the key is empty, absolute, or has ``..``/``.``/empty parts or a
            backslash, any of which could address something outside the store.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"store key {key!r} must be a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"store key {key!r} has an empty, '.' or '..' component")
    return key


@runtime_checkable
class Store(Protocol):
    """Where bytes live and when they count."""

    @property
    def url(self) -> str:
        """A human-readable address of the store's root (a path or a URL)."""
        ...

    def write(self, key: str, data: Data) -> int:
        """Write ``data`` (a buffer or an iterable of buffers) atomically at ``key``.

        Returns:
            The number of bytes written.
        """
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> memoryview:
        """Read ``length`` bytes of ``key`` from ``offset`` (to the end when None).

        Raises:
            FileNotFoundError: ``key`` does not exist.
        """
        ...

    def size(self, key: str) -> int:
        """Size in bytes of ``key``. Raises ``FileNotFoundError`` when missing."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        ...

    def commit(self) -> None:
        """Make everything written so far durable and visible to other readers."""
        ...


# -- optional capabilities ---------------------------------------------------------------
#
# A backend that can do more than the core protocol says so by implementing one of these;
# callers check with ``isinstance(store, Lockable)``, never by probing attributes.


@runtime_checkable
class WriterLock(Protocol):
    """The single-writer lock of a run directory (an flock, an object-store lease)."""

    def acquire(self) -> WriterLock:
        """Take the lock. Raises :class:`~trainguard.errors.LockHeld` when another holds it."""
        ...

    def confirm(self) -> WriterLock:
        """Check the lock is still ours right before publishing or deleting.

        Raises:
            LockHeld: another writer took it over (a lease that expired while frozen).
        """
        ...

    def release(self) -> None:
        """Give the lock up; releasing one not held is not an error."""
        ...


@runtime_checkable
class Lockable(Protocol):
    """A store whose run directory has a single-writer lock."""

    def lock(self, name: str, purpose: str = "writer") -> WriterLock:
        """The lock called ``name`` (not taken yet)."""
        ...


@runtime_checkable
class ExclusiveCreate(Protocol):
    """A store that can create a key only if it is absent (the commit's safety net)."""

    def create(self, key: str, data: Data) -> int:
        """Write ``key`` atomically unless it exists.

        Raises:
            FileExistsError: ``key`` exists; it is untouched.
        """
        ...


@runtime_checkable
class Refreshable(Protocol):
    """A store whose view can be stale until refreshed (a Modal volume: ``reload``)."""

    def refresh(self) -> None:
        """See what other writers committed since this view was taken."""
        ...


@runtime_checkable
class TempCleaning(Protocol):
    """A store whose writes leave temporary files when a writer is killed mid-write."""

    def remove_temp_files(self, prefix: str = "") -> list[str]:
        """Remove what killed writers left under ``prefix``; returns the removed paths."""
        ...


@runtime_checkable
class Retrying(Protocol):
    """A store with its own retry budget (an object store behind a network)."""

    def with_retry(self, retry: object) -> Store:
        """A view of this store that retries with ``retry`` (a ``Backoff``) instead."""
        ...
