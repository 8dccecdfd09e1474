"""The background half of a save: write shards, checksum on the fly, manifest, commit.

The calling thread stages every shard into host memory, then hands them to a ``SaveJob``
thread (starting the writes only after the snapshot keeps the writer's copying and
checksumming off the cores the snapshot needs), with the small final pieces
(state.json, metrics), and returns to training; the job writes the shards, then
the state file, then checks that this process may still write the run (the writer
lease of an object store: it may have been lost while the process was frozen), then
creates the manifest (never replacing one), then commits, then runs the manager's
post-commit hook (retention).

The job thread is not a daemon: a normal interpreter exit waits for the in-flight save to
commit. An exception in the job is logged at once and kept; ``SaveHandle.wait()`` and the
manager's next ``save``/``wait``/``close`` raise it, so it is never silently lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from trainguard.checkpoint.format import MANIFEST, FileEntry, Manifest, ShardPlan
from trainguard.errors import CheckpointError, CheckpointExists

log = logging.getLogger("trainguard.checkpoint")

_ABORT = object()


@dataclass
class FinalPieces:
    """What the job needs after the last shard: the rest of the checkpoint.

    Attributes:
        state_json: the state file's bytes.
        state_name: its name (unique to this save).
        make_manifest: builds the manifest from every file's entry.
        on_commit: runs right after the commit (retention).
        before_publish: raises when this process may no longer write the run (a lost
            lease); nothing is published then.
    """

    state_json: bytes
    state_name: str
    make_manifest: Callable[[dict[str, FileEntry]], Manifest]
    on_commit: Callable[[Manifest], None]
    before_publish: Callable[[], None] = lambda: None


def publish_manifest(store, key: str, manifest: Manifest) -> None:
    """Create ``key/manifest.json``, never replacing one: the commit of a checkpoint.

    Stores with a create-if-absent (``create``) use it, so a writer that lost the run to
    another can never replace that writer's manifest; others get a plain write.

    Raises:
        CheckpointExists: a manifest is there already (another writer committed this
            step meanwhile); its checkpoint is untouched.
    """
    create = getattr(store, "create", None)
    path = f"{key}/{MANIFEST}"
    if create is None:
        store.write(path, manifest.to_bytes())
        return
    try:
        create(path, manifest.to_bytes())
    except FileExistsError:
        raise CheckpointExists(
            f"step {manifest.step} was committed at {store.url}/{key} by another writer while "
            f"this save was being written; this save is dropped and that checkpoint is "
            f"untouched") from None


class SaveJob(threading.Thread):
    """Writes one checkpoint in the background (see module docs)."""

    def __init__(self, step: int, key: str, write_file: Callable, store,
                 started: float) -> None:
        super().__init__(name=f"trainguard-save-{step}", daemon=False)
        self.step, self.key, self.store = step, key, store
        self._write_file = write_file
        self._inbox: queue.Queue = queue.Queue()
        self.started = started
        self.error: BaseException | None = None
        self.error_reported = False  # raised to the caller once, through any path
        self.manifest: Manifest | None = None
        self.committed_at: float | None = None

    def put(self, shard: ShardPlan) -> None:
        """Hand over a staged shard (its tensors must not change until the job ends)."""
        self._inbox.put(shard)

    def finish(self, pieces: FinalPieces) -> None:
        """Hand over the final pieces; the job commits once every shard is written."""
        self._inbox.put(pieces)

    def abort(self) -> None:
        """Stop without committing (the caller failed while staging)."""
        self._inbox.put(_ABORT)

    def run(self) -> None:
        files: dict[str, FileEntry] = {}
        try:
            while True:
                item = self._inbox.get()
                if item is _ABORT:
                    return
                if isinstance(item, FinalPieces):
                    break
                files[item.name] = self._write_file(f"{self.key}/{item.name}", item.chunks)
            state_json = memoryview(item.state_json)
            files[item.state_name] = self._write_file(f"{self.key}/{item.state_name}",
                                                      lambda: [state_json])
            manifest = item.make_manifest(files)
            item.before_publish()
            # The manifest is created last and committed at once: its presence is the commit.
            publish_manifest(self.store, self.key, manifest)
            self.store.commit()
            self.manifest, self.committed_at = manifest, time.monotonic()
            item.on_commit(manifest)
        except BaseException as exc:  # kept for the caller; never silently lost
            self.error = exc
            log.error("save of step %d failed: %r (it is not committed; the previous "
                      "checkpoint is still the latest valid one)", self.step, exc)


class FailedSaves:
    """The in-flight save of a manager, and its failure until raised exactly once: by
    the save's own handle (``wait()``) or else by the manager's next raising call.

    ``save`` is anything with ``join()``, ``error`` and ``error_reported`` (a
    :class:`SaveJob`, a sharded save).
    """

    def __init__(self) -> None:
        self.inflight = None
        self._failed = None

    def drain(self) -> None:
        """Wait for the in-flight save; keep it if it failed."""
        save, self.inflight = self.inflight, None
        if save is not None:
            save.join()
            if save.error is not None and not save.error_reported:
                self._failed = save

    def raise_pending(self, describe: Callable[[object], str]) -> None:
        """Drain, then raise a kept failure unless its handle already did.

        Raises:
            CheckpointError: ``describe(save)``, chained to the save's error.
        """
        self.drain()
        save, self._failed = self._failed, None
        if save is not None and not save.error_reported:
            save.error_reported = True
            raise CheckpointError(describe(save)) from save.error


class SaveHandle:
    """The result of :meth:`CheckpointManager.save`.

    ``wait()`` blocks until the checkpoint is committed and returns its
    :class:`~trainguard.checkpoint.CheckpointInfo` (None for a skipped save), or raises
    the error that stopped it.
    """

    def __init__(self, step: int, job: SaveJob | None = None, make_info: Callable | None = None,
                 stall_seconds: float = 0.0) -> None:
        self.step = step
        self._job = job
        self._make_info = make_info
        #: seconds the calling thread was blocked by ``save`` (snapshot time).
        self.stall_seconds = stall_seconds

    @property
    def skipped(self) -> bool:
        """True when this save was skipped because another one was still in flight."""
        return self._job is None

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._job is None or not self._job.is_alive()

    def wait(self, timeout: float | None = None):
        """Block until committed; returns the checkpoint's info (None if skipped).

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            CheckpointError: the background write failed (the cause is chained).
        """
        if self._job is None:
            return None
        self._job.join(timeout)
        if self._job.is_alive():
            raise TimeoutError(f"save of step {self.step} still running after {timeout} s")
        if self._job.error is not None:
            self._job.error_reported = True
            raise CheckpointError(f"save of step {self.step} failed: {self._job.error!r}") \
                from self._job.error
        return self._make_info(self._job.manifest)

    @property
    def seconds_to_durable(self) -> float | None:
        """Seconds from the ``save`` call to the commit (None until committed)."""
        if self._job is None or self._job.committed_at is None:
            return None
        return self._job.committed_at - self._job.started
