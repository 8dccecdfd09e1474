"""The exception tree of trainguard.

Every error trainguard raises on purpose derives from :class:`TrainguardError`, so
``except TrainguardError`` catches all of them. The tree is shallow on purpose::

    TrainguardError                    exit code 1
    ├── StoreError                     a storage backend failed (I/O, permissions)
    │   └── UnsafePath                 a link or special file where a plain file belongs
    ├── RunDirError                    a run directory is missing, empty or not a directory
    ├── CheckpointError                a checkpoint-level problem
    │   ├── CheckpointCorrupt          checksum / size / format mismatch: never loaded
    │   ├── CheckpointNotFound         nothing valid to restore (also a FileNotFoundError)
    │   ├── CheckpointExists           a committed checkpoint already holds that step
    │   └── StateMismatch              saved state does not fit the object restored into
    ├── LockHeld                       another live writer owns the run directory
    └── DataGateFailed                 the dataset is empty, stale or fails a requirement

Each user-facing error carries ``exit_code`` (the CLI exits with it) and a message that
names the thing at fault and the fix. Lower-layer errors (``OSError``) are translated at
the store boundary with ``raise StoreError(...) from exc`` so the cause is kept.
"""

from __future__ import annotations


class TrainguardError(Exception):
    """Root of every error trainguard raises on purpose.

    Attributes:
        exit_code: the process exit code the CLI uses for this error.
    """

    exit_code: int = 1


class StoreError(TrainguardError):
    """A storage backend could not read, write, list or delete a key."""


class UnsafePath(StoreError):
    """A path in a run directory is a symbolic link or not a regular file.

    trainguard never makes either inside a run directory, so one found there was planted
    or copied in by mistake: it is neither read nor written through.
    """


class RunDirError(TrainguardError):
    """A run directory is missing, empty, or is not a directory."""

    exit_code = 2


class CheckpointError(TrainguardError):
    """Base class for checkpoint-level problems."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint failed verification (checksum, size, format); it is never loaded."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No valid checkpoint exists where one was asked for."""


class CheckpointExists(CheckpointError):
    """A committed checkpoint already exists at the step being saved."""


class StateMismatch(CheckpointError):
    """A saved value does not fit the live object it is restored into."""


class LockHeld(TrainguardError):
    """Another live process holds the run directory's writer lock."""

    exit_code = 3


class DataGateFailed(TrainguardError):
    """The dataset is missing, stale, or its totals fail a requirement; no step was run."""

    exit_code = 4
