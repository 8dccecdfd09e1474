"""The storage boundary: a small protocol on string keys.

Keys are ``/``-separated relative paths (``checkpoints/step-000000100/manifest.json``).
They are strings, not :class:`pathlib.Path`, so that later backends addressed by URL
(``s3://bucket/prefix``) are not mangled. Every backend is tested by the same
conformance suite (``tests/unit/store_conformance.py``).

Semantics every backend guarantees:

* ``write`` of one key is all-or-nothing: a reader sees the old object, nothing, or the
  whole new object, never a prefix of it.
* ``commit`` makes everything written so far durable and visible to other readers.
  Callers that publish (the checkpoint manifest) call it right after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, Union, runtime_checkable

#: Anything ``memoryview()`` accepts: bytes, bytearray, mmap, numpy arrays.
Buffer = Union[bytes, bytearray, memoryview]
#: One buffer, or an iterable of buffers written back to back (a stream).
Data = Union[Buffer, Iterable[Buffer]]


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
