"""The commit protocol: when a checkpoint exists, and who may make or unmake one.

A checkpoint of step N exists for readers exactly when ``checkpoints/step-N/manifest.json``
exists (and checks out: that part is the reader's). Every writer goes through this
module, so the rule has one home:

* :func:`publish` is the commit: the manifest is created, never replaced (a store with
  :class:`~trainguard.store.base.ExclusiveCreate` makes that atomic), then the store is
  committed. It is called only after every file the manifest names is written.
* :func:`unpublish` is the reverse, and always the *first* step of a delete: the manifest
  goes (and the store commits) before any file, so a crash mid-delete leaves a
  manifest-less directory, which readers ignore, never half a checkpoint.
* :func:`retire` marks a directory whose checkpoint is deleted but whose files later
  (incremental) checkpoints still read, so it is neither a checkpoint nor an interrupted
  save.
* :class:`WriterGuard` holds the run directory's single-writer lock. Its
  :meth:`~WriterGuard.confirm` runs right before every publish and every delete: a
  writer that lost the run (an object-store lease taken over while it was frozen)
  stops there.

The local writer (``writer.py``), the sharded one (``dcp.py``), the uploader
(``mirror.py``) and retention (``pruning.py``) use nothing else to publish or unpublish.
"""

from __future__ import annotations

import json

from trainguard.checkpoint.format import MANIFEST, RETIRED, Manifest, step_dir
from trainguard.errors import CheckpointExists
from trainguard.store.base import ExclusiveCreate, Lockable, Store, WriterLock

LOCK_NAME = ".trainguard.lock"


def manifest_key(step: int) -> str:
    """The store key whose presence is the commit of ``step``."""
    return f"{step_dir(step)}/{MANIFEST}"


def is_committed(store: Store, step: int) -> bool:
    """Whether a manifest exists for ``step`` (whether it checks out is the reader's)."""
    return store.exists(manifest_key(step))


def publish(store: Store, manifest: Manifest | bytes, step: int | None = None, *,
            replace: bool = False) -> None:
    """Commit a checkpoint: create its manifest, then commit the store.

    Args:
        manifest: the manifest, or its exact bytes (a copy of another store's).
        step: the step (read from ``manifest`` when it is a :class:`Manifest`).
        replace: allow replacing an existing manifest. Only the uploader does, for a
            copy of a checkpoint it already committed at the source; a save never does.

    Raises:
        CheckpointExists: a manifest is there already (another writer committed this
            step meanwhile); its checkpoint is untouched.
    """
    if isinstance(manifest, Manifest):
        step, raw = manifest.step, manifest.to_bytes()
    else:
        raw = bytes(manifest)
    if step is None:
        raise TypeError("publish needs the step of raw manifest bytes")
    key = manifest_key(step)
    if replace or not isinstance(store, ExclusiveCreate):
        store.write(key, raw)
    else:
        try:
            store.create(key, raw)
        except FileExistsError:
            raise CheckpointExists(
                f"step {step} was committed at {store.url}/{step_dir(step)} by another writer "
                f"while this save was being written; this save is dropped and that "
                f"checkpoint is untouched") from None
    store.commit()


def unpublish(store: Store, step: int) -> bool:
    """Un-commit ``step``: delete its manifest and commit, before any of its files go.

    Returns:
        Whether there was a manifest to delete.
    """
    key = manifest_key(step)
    if not store.exists(key):
        return False
    store.delete(key)
    store.commit()
    return True


def retire(store: Store, step: int, why: str) -> None:
    """Mark ``step``'s directory as holding only files other checkpoints read (``why``).

    Done before :func:`unpublish`, so the directory is never seen as an interrupted save.
    Not committed here: the unpublish that follows commits it.
    """
    key = f"{step_dir(step)}/{RETIRED}"
    if not store.exists(key):
        store.write(key, json.dumps({"kept_for": why}).encode())


class WriterGuard:
    """The single-writer lock of one run directory, taken on first use.

    A store that is not :class:`~trainguard.store.base.Lockable` (a read-only view) has
    no lock; the guard is then a no-op.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock: WriterLock | None = None

    @property
    def lock(self) -> WriterLock | None:
        """The lock, once taken (None before, or for a store without one)."""
        return self._lock

    def acquire(self) -> None:
        """Take the lock now (saves, deletes and gc take it anyway).

        Raises:
            LockHeld: another live process writes this run directory.
        """
        if self._lock is None:
            if not isinstance(self.store, Lockable):
                return
            self._lock = self.store.lock(LOCK_NAME)
        self._lock.acquire()

    def confirm(self) -> None:
        """Right before publishing or deleting: check this process still owns the run.

        An flock cannot be lost while held; an object-store lease can (its holder frozen
        past the ttl, another taking it over), and this asks the store.

        Raises:
            LockHeld: the run has another writer now; nothing may be written or deleted.
        """
        self.acquire()
        if self._lock is not None:
            self._lock.confirm()

    def release(self) -> None:
        """Give the lock up (if taken)."""
        if self._lock is not None:
            self._lock.release()
