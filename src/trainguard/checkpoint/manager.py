"""``CheckpointManager``: one run's checkpoints, as one object users hold.

A thin facade. The work is done by the modules it composes, each owning one concern:

* ``writer.CheckpointWriter``: snapshot -> write -> checksum -> manifest -> commit, in
  the background, at most one save in flight;
* ``reader.CheckpointReader``: list (``catalog``), verify every byte, restore with the
  fallback across tiers;
* ``pruning.prune``: retention after each commit, and ``gc``;
* ``commit``: the commit protocol (publish, unpublish) and the writer lock, which every
  writer above goes through;
* ``mirror.Mirror``: with two tiers, the background upload to a bucket.

:class:`ManagerInterface` is what the run layer needs of a manager; the one-process
:class:`CheckpointManager` and the run layer's ``DistributedManager`` (one rank of a
torchrun job) both implement it.

Invariants (each one is tested; each module's docs say how it keeps its own):

* A checkpoint exists for readers exactly when its manifest does; a process killed at
  any instant leaves at worst a manifest-less directory, which every reader ignores.
* A save never changes a file a committed manifest names, nor replaces a manifest.
* Nothing is loaded before every file of the checkpoint has been verified.
* Retention un-commits first and never deletes the newest valid checkpoint nor the one
  just written; files that kept incremental checkpoints read stay until unreferenced.
* One writer per run directory (a lock, taken on the first save or gc, confirmed before
  every publish and delete).
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from trainguard.checkpoint import commit
from trainguard.checkpoint.catalog import CheckpointInfo, best_of, newest_step
from trainguard.checkpoint.format import Manifest
from trainguard.checkpoint.mirror import Mirror
from trainguard.checkpoint.pruning import prune
from trainguard.checkpoint.reader import CheckpointReader
from trainguard.checkpoint.retention import RetentionPolicy
from trainguard.checkpoint.writer import CheckpointWriter, SaveHandle
from trainguard.store import Store, open_store

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "CheckpointInfo", "CheckpointManager",
           "ManagerInterface", "best_of"]

log = logging.getLogger("trainguard.checkpoint")

DEFAULT_MAX_SHARD_BYTES = 512 << 20


@runtime_checkable
class ManagerInterface(Protocol):
    """What a Run needs of its checkpoint manager (one process, or one rank of many)."""

    store: Store
    #: "wait": a save waits for the one in flight; "skip": it is skipped.
    if_busy: str

    def acquire_writer(self) -> None:
        """Take the run directory's writer lock now (where this process holds it)."""
        ...

    def prepare(self, state: dict) -> None:
        """Reserve what saves of ``state`` need, so the first save stalls no longer."""
        ...

    def save(self, step: int, state: dict, metrics: dict | None = None, *,
             tags: dict[str, str] | None = None, reason: str = "periodic",
             blocking: bool = False) -> SaveHandle:
        """Snapshot ``state`` as ``step``; write and commit it (in the background)."""
        ...

    def wait(self) -> None:
        """Block until the in-flight save committed; raise a kept background failure."""
        ...

    def close(self) -> None:
        """Finish the in-flight save (and upload); release the lock."""
        ...

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory, oldest first."""
        ...

    def latest_valid(self, resumable: bool = False) -> CheckpointInfo | None:
        """The newest checkpoint that passes the cheap check."""
        ...

    def verify(self, step: int) -> CheckpointInfo:
        """Check every byte of the checkpoint at ``step``."""
        ...

    def restore(self, state: dict, step: int | None = None) -> int:
        """Load a checkpoint into ``state``; returns its step."""
        ...


class CheckpointManager:
    """Saves, lists, verifies, restores and prunes the checkpoints of one run.

    Args:
        store: a run directory path, or a :class:`~trainguard.store.Store`.
        keep: retention policy applied after each commit (None keeps everything).
        max_shard_bytes: upper bound of one safetensors file (a bigger tensor gets its own).
        incremental: skip tensors unchanged since the previous save (opt-in: see
            ``snapshot.ChangeTracker`` for what it can miss).
        if_busy: when a save is in flight, a new one waits for it ("wait") or is
            skipped ("skip").
        mirror: a second, remote tier (a bucket URL or store): each committed
            checkpoint is uploaded to it in the background, and restore falls back to it.
        mirror_timeout: seconds ``close`` waits for the upload to finish.

    Example::

        mgr = CheckpointManager("runs/exp1", keep=keep_last(3))
        mgr.save(step, {"model": model, "optimizer": opt, "rng": RNGState()},
                 metrics={"loss": loss})
        step = mgr.restore({"model": model, "optimizer": opt, "rng": RNGState()})
    """

    def __init__(self, store: str | Store, *, keep: RetentionPolicy | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, incremental: bool = False,
                 if_busy: str = "wait", mirror: str | Store | None = None,
                 mirror_timeout: float = 600.0) -> None:
        if keep is not None and not callable(keep):
            raise TypeError(f"keep must be a retention policy such as keep_last(3), got {keep!r}")
        self.store = open_store(store)
        self.keep = keep
        self.mirror_timeout = mirror_timeout
        self.guard = commit.WriterGuard(self.store)
        #: The remote tier's manager (two tiers), or None.
        self.remote: CheckpointManager | None = None
        #: The uploader to the remote tier (two tiers), or None.
        self.mirror: Mirror | None = None
        if mirror is not None:
            self.remote = CheckpointManager(mirror, max_shard_bytes=max_shard_bytes)
            self.mirror = Mirror(self.store, self.remote.store,
                                 after_upload=self._remote_retention)
        self.reader = CheckpointReader(self.store, self.remote.reader if self.remote else None)
        self.writer = CheckpointWriter(self.store, self.guard, verify=self.verify,
                                       after_commit=self.committed,
                                       max_shard_bytes=max_shard_bytes,
                                       incremental=incremental, if_busy=if_busy)

    @property
    def if_busy(self) -> str:
        return self.writer.if_busy

    @property
    def max_shard_bytes(self) -> int:
        return self.writer.max_shard_bytes

    @property
    def incremental(self) -> bool:
        return self.writer.incremental

    # -- lifecycle -----------------------------------------------------------------------

    def acquire_writer(self) -> None:
        """Take the run directory's writer lock now (saves and gc take it anyway).

        Raises:
            LockHeld: another live process writes this run directory.
        """
        self.guard.acquire()

    def wait(self) -> None:
        """Block until the in-flight save (if any) has committed.

        Raises:
            CheckpointError: a background save failed since the last raising call.
        """
        self.writer.wait()

    def close(self) -> None:
        """Finish the in-flight save and (two tiers) its upload, then release the lock.

        The upload is waited for at most ``mirror_timeout`` seconds; past that an error
        is logged and the remote tier stays at its newest uploaded step.

        Raises:
            CheckpointError: a background save failed (the lock is released anyway).
        """
        try:
            self.writer.close()
        finally:
            if self.mirror is not None and not self.mirror.close(self.mirror_timeout):
                log.error("upload to %s did not finish within %.0f s; the remote tier's "
                          "newest step is %s", self.remote.store.url, self.mirror_timeout,
                          self.mirror.uploaded_step)
            if self.remote is not None:
                self.remote.close()  # its writer lock/lease, taken by remote retention
            self.guard.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- saving --------------------------------------------------------------------------

    def prepare(self, state: dict) -> None:
        """Reserve, in the background, the host memory that saves of ``state`` copy into.

        Call it once the state is built (``Run`` does, right after resuming): the first
        save then stalls no longer than later ones instead of also allocating (and, for
        GPU state, pinning) a host copy of the whole state. Optional: without it the
        first save allocates what it needs.
        """
        self.writer.prepare(state)

    def save(self, step: int, state: dict, metrics: dict | None = None, *,
             tags: dict[str, str] | None = None, reason: str = "periodic",
             blocking: bool = False) -> SaveHandle:
        """Snapshot ``state`` as the checkpoint of ``step``; write and commit it.

        Returns as soon as the snapshot is in host memory (``blocking=False``): from then
        on the caller may mutate its tensors freely. The write, checksums, manifest,
        commit and retention continue in the background; ``handle.wait()`` (or the
        manager's ``wait``/``close``) blocks until committed. When a save is already in
        flight, this one waits for it (``if_busy="wait"``) or is skipped (``"skip"``).

        Args:
            step: training step (non-negative int); one checkpoint per step.
            state: dict of modules, optimizers, schedulers, tensors, JSON-able values...
            metrics: numbers recorded in the manifest (used by ``keep_best``).
            tags: free-form strings recorded in the manifest.
            reason: why this save happens ("periodic", "final", "preempted", "error").
            blocking: wait for the commit before returning.

        Returns:
            A :class:`SaveHandle`; ``wait()`` gives the committed :class:`CheckpointInfo`.

        Raises:
            CheckpointExists: a committed checkpoint already holds ``step``.
            CheckpointError: the previous background save failed (raised once).
            LockHeld: another process writes this run directory.
            TypeError: the state holds a value that cannot be saved without pickle.
        """
        return self.writer.save(step, state, metrics, tags=tags, reason=reason,
                                blocking=blocking)

    def committed(self, manifest: Manifest) -> None:
        """What follows every commit to this run (its own saves', or a sharded save's
        coordinator): the upload (two tiers), then retention. Never raises: a failing
        delete must not fail a committed save."""
        if self.mirror is not None:
            self.mirror.enqueue(manifest.step)
        if self.keep is not None:
            try:
                prune(self.store, self.keep, self.guard, protect={manifest.step})
            except Exception as exc:
                log.warning("retention after step %d failed: %r", manifest.step, exc)

    def _remote_retention(self, step: int) -> None:
        if self.keep is not None and self.remote is not None:
            prune(self.remote.store, self.keep, self.remote.guard, protect={step})

    # -- reading -------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory, oldest first, each marked valid or with its problem.

        This is a cheap check (manifest parses, files present with the recorded sizes);
        :meth:`verify` also checks every byte. Waits for this manager's in-flight save.
        """
        self.writer.drain()
        return self.reader.list()

    def tiers(self) -> dict[str, int | None]:
        """Newest valid step of each tier: ``{"primary": 120, "mirror": 100}``."""
        newest = {"primary": newest_step(self.list())}
        if self.remote is not None:
            newest["mirror"] = newest_step(self.reader.remote_list())
        return newest

    def best(self, metric: str, mode: str = "min") -> CheckpointInfo | None:
        """The valid checkpoint with the best ``metric`` (``mode`` "min" or "max"), as
        :func:`best_of` picks it; None when no checkpoint recorded the metric.
        ``restore(state, step=mgr.best("val_loss").step)`` loads it.

        Raises:
            ValueError: a bad ``mode`` or an empty ``metric``.
        """
        return best_of(self.list(), metric, mode)

    def candidates(self) -> list[CheckpointInfo]:
        """Checkpoints of every tier, newest first; the primary first at equal steps
        (``info.tier`` says which)."""
        self.writer.drain()
        return self.reader.candidates()

    def latest_valid(self, resumable: bool = False) -> CheckpointInfo | None:
        """The newest checkpoint that passes the cheap check, or None.

        With two tiers, the newer of the primary's and the mirror's (``info.tier``
        says which), so a fresh machine finds the checkpoints in the bucket.

        Args:
            resumable: skip checkpoints saved mid-step after an error (kept for
                inspection): the newest one a resume starts from.
        """
        self.writer.drain()
        return self.reader.latest_valid(resumable)

    def verify(self, step: int) -> CheckpointInfo:
        """Check every byte of the checkpoint at ``step``; the result's ``problem`` says why
        it is bad (naming the file), or is None when it verifies.

        Raises:
            CheckpointNotFound: there is no directory for ``step``.
        """
        self.writer.drain()
        return self.reader.verify(step)

    def restore(self, state: dict, step: int | None = None) -> int:
        """Load a checkpoint into ``state`` in place; returns the restored step.

        With ``step=None`` the newest checkpoint that fully verifies is used (of either
        tier); corrupt or partial ones are skipped with a warning naming the file and
        the reason.

        Raises:
            CheckpointNotFound: nothing valid to restore (or no checkpoint at ``step``).
            CheckpointCorrupt: the explicitly requested ``step`` does not verify.
            StateMismatch: the checkpoint does not fit ``state`` (shapes, dtypes).
        """
        self.writer.drain()
        return self.reader.restore(state, step)

    # -- retention -----------------------------------------------------------------------

    def gc(self, policy: RetentionPolicy, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Delete what ``policy`` does not keep (and interrupted saves); returns those.

        Besides the policy, the newest checkpoint that fully verifies is always kept.

        Raises:
            LockHeld: a live writer owns the run directory (its own policy applies).
        """
        self.writer.drain()
        if not dry_run:
            self.acquire_writer()
        # The newest checkpoint that verifies byte for byte is kept whatever the policy
        # says: the cheap check alone could protect a rotten one and delete the good.
        protect = set()
        for info in reversed(self.reader.list()):
            if info.valid and self.reader.verify(info.step).valid:
                protect.add(info.step)
                break
        return prune(self.store, policy, self.guard, protect=protect, dry_run=dry_run)
