"""Saving one process's checkpoints: snapshot, write, checksum, manifest, commit.

:class:`CheckpointWriter` does a save in two halves. The calling thread stages every
tensor into reusable host memory (``snapshot.HostArena``) and returns to training: from
then on the caller may change its tensors freely. A :class:`SaveJob` thread (started
writing only after the snapshot, so its copying and checksumming stay off the cores the
snapshot needs) writes the shards, then the state file, then confirms this process may
still write the run (``commit.WriterGuard``), then publishes the manifest
(``commit.publish``: created, never replaced, then the store committed), then runs the
post-commit hook (the upload and retention). At most one save is in flight.

Invariants (each one is tested):

* A save never changes a file a committed manifest names, nor replaces a manifest: its
  files carry a token of its own (``format.member_name``), and its manifest is created
  if absent. So a writer that lost the run to another one cannot tear the other's
  checkpoints.
* The job thread is not a daemon: a normal interpreter exit waits for the in-flight
  save to commit. An exception in the job is logged at once and kept;
  ``SaveHandle.wait()`` and the writer's next ``save``/``wait``/``close`` raise it
  (exactly once), so it is never silently lost.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from trainguard._units import human_bytes
from trainguard.checkpoint import commit
from trainguard.checkpoint.catalog import CheckpointInfo
from trainguard.checkpoint.format import (
    RETIRED,
    STATE_FILE,
    FileEntry,
    FileRef,
    HashedChunks,
    Manifest,
    ShardPlan,
    manifest_metrics,
    manifest_tags,
    member_name,
    new_writer,
    plan_shards,
    step_dir,
    writer_versions,
)
from trainguard.checkpoint.schema import MAX_STATE_BYTES
from trainguard.checkpoint.snapshot import ChangeTracker, HostArena, Location
from trainguard.checkpoint.tree import flatten_with_fresh
from trainguard.errors import CheckpointError, CheckpointExists
from trainguard.store.base import Store

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
            commit.publish(self.store, manifest)  # created last: its presence is the commit
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


class CheckpointWriter:
    """The save pipeline of one process on one store (see module docs).

    Args:
        store: the run's store.
        guard: its writer lock, confirmed before every publish and delete.
        verify: checks every byte of a committed step (the reader's ``verify``): a save
            replaces a checkpoint that does not verify, never one that does.
        after_commit: runs in the save thread right after each commit (upload,
            retention); an exception there is logged, never fails the save.
        max_shard_bytes: upper bound of one safetensors file (a bigger tensor gets its own).
        incremental: skip tensors unchanged since the previous save.
        if_busy: when a save is in flight, "wait" for it or "skip" the new one.
    """

    def __init__(self, store: Store, guard: commit.WriterGuard, *,
                 verify: Callable[[int], CheckpointInfo],
                 after_commit: Callable[[Manifest], None] = lambda manifest: None,
                 max_shard_bytes: int, incremental: bool = False,
                 if_busy: str = "wait") -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if if_busy not in ("wait", "skip"):
            raise ValueError(f"if_busy must be 'wait' or 'skip', got {if_busy!r}")
        self.store, self.guard = store, guard
        self.max_shard_bytes = max_shard_bytes
        self.incremental = incremental
        self.if_busy = if_busy
        self._verify, self._after_commit_hook = verify, after_commit
        #: The host memory every save copies into (reused; pinned for GPU state).
        self.arena = HostArena()
        self._tracker = ChangeTracker()
        self._saves = FailedSaves()  # the save in flight; a failure not raised yet
        self._ref_entries: dict[tuple[int, str], FileEntry] = {}  # files a next save may reuse

    def drain(self) -> None:
        """Wait for the in-flight save; keep its error for the next raising call."""
        self._saves.drain()

    def wait(self) -> None:
        """Block until the in-flight save (if any) has committed.

        Raises:
            CheckpointError: a background save failed since the last raising call.
        """
        self._saves.raise_pending(lambda job: f"a background save failed: {job.error!r}")

    def close(self) -> None:
        """Finish the in-flight save and give the host memory back.

        Raises:
            CheckpointError: a background save failed.
        """
        try:
            self.wait()
        finally:
            self.arena.release()  # the host copy of the state (pinned: unpinned first)

    def prepare(self, state: dict) -> None:
        """Reserve, in the background, the host memory that saves of ``state`` copy into."""
        _, tensors, _ = flatten_with_fresh(state)
        tensors = list(tensors.values())
        self.arena.reserve(HostArena.bytes_needed(tensors),
                           pin=any(t.device.type == "cuda" for t in tensors))

    def save(self, step: int, state: dict, metrics: dict | None = None, *,
             tags: dict[str, str] | None = None, reason: str = "periodic",
             blocking: bool = False) -> SaveHandle:
        """Snapshot ``state`` as the checkpoint of ``step``; write and commit it in the
        background (``CheckpointManager.save`` documents the arguments and errors)."""
        key = step_dir(step)
        metrics, tags = manifest_metrics(metrics), manifest_tags(tags)
        running = self._saves.inflight
        if running is not None and running.is_alive() and self.if_busy == "skip":
            log.info("skipping save of step %d: step %d is still being written",
                     step, running.step)
            return SaveHandle(step)
        self.wait()
        self.guard.acquire()
        self._clear_the_way(step, key)
        started = time.monotonic()
        tree, tensors, fresh = flatten_with_fresh(state)
        if self.incremental:
            changed, unchanged, observed = self._tracker.split(tensors, fresh)
        else:
            changed, unchanged, observed = tensors, {}, None
        state_json = _state_json(tree, unchanged)
        # Leftovers of an interrupted save of this step stay until retention: this save's
        # files carry their own names, and deleting here could hit a live writer's files.
        writer = new_writer()
        job = SaveJob(step, key, self._write, self.store, started)
        job.start()
        try:
            shards = self._stage(changed, job, writer)
        except BaseException:
            job.abort()
            job.join()
            raise
        locations = {name: Location(step, shard.name, name)
                     for shard in shards for name, _ in shard.tensors}
        locations.update(unchanged)
        refs = tuple(FileRef(s, f, self._ref_entries[(s, f)].size,
                             self._ref_entries[(s, f)].checksum)
                     for s, f in sorted({(loc.step, loc.file) for loc in unchanged.values()}))
        versions = writer_versions()

        def make_manifest(files: dict[str, FileEntry]) -> Manifest:
            return Manifest(step=step, created_at=time.time(), files=files, metrics=metrics,
                            tags=tags, reason=reason, versions=versions, refs=refs,
                            writer=writer)

        def on_commit(manifest: Manifest) -> None:
            self._committed(job, manifest, observed, locations)

        self._saves.inflight = job
        job.finish(FinalPieces(state_json, member_name(STATE_FILE, writer), make_manifest,
                               on_commit, before_publish=self.guard.confirm))
        handle = SaveHandle(step, job, lambda m: CheckpointInfo(step, key, m),
                            stall_seconds=time.monotonic() - started)
        if blocking:
            handle.wait()
        return handle

    def _clear_the_way(self, step: int, key: str) -> None:
        """Refuse to overwrite a good checkpoint; un-commit a bad one at the same step.

        A checkpoint that fails verification was skipped by ``restore``; reaching its
        step again must replace it, not fail forever. A retired directory holds files
        that kept (incremental) checkpoints read: it is never overwritten.
        """
        if self.store.exists(f"{key}/{RETIRED}"):
            raise CheckpointExists(
                f"{self.store.url}/{key} holds files that later checkpoints still read "
                f"(incremental saves); save under a step after the newest checkpoint, or "
                f"start a new run directory")
        if not commit.is_committed(self.store, step):
            return
        existing = self._verify(step)
        if existing.valid:
            raise CheckpointExists(
                f"step {step} is already committed at {self.store.url}/{key}; "
                f"save under a new step, or delete that checkpoint first")
        log.warning("replacing checkpoint step %d, which does not verify (%s)", step,
                    existing.problem)
        self.guard.confirm()
        commit.unpublish(self.store, step)  # un-commit first, as retention does

    def _stage(self, tensors: dict[str, torch.Tensor], job: SaveJob,
               writer: str) -> list[ShardPlan]:
        """Copy tensors into the host arena, then hand every shard to the job.

        The job starts writing only once the snapshot is complete: on a few cores its
        copying and checksumming would otherwise slow the snapshot, which is the part
        that blocks training (measured: 1.27-1.58x memcpy overlapped, 0.88-1.11x not).
        """
        shards = plan_shards(tensors, self.max_shard_bytes, writer)
        pin = any(t.device.type == "cuda" for t in tensors.values())
        self.arena.reset(HostArena.bytes_needed(list(tensors.values())), pin)
        staged = [ShardPlan(shard.name, [(n, self.arena.copy(t)) for n, t in shard.tensors])
                  for shard in shards]
        self.arena.synchronize()
        for shard in staged:
            job.put(shard)
        return shards

    def _committed(self, job: SaveJob, manifest: Manifest, observed: dict | None,
                   locations: dict[str, Location]) -> None:
        """Runs in the save thread right after the commit."""
        log.info("committed step %d (%s, %.2f s) to %s", manifest.step,
                 human_bytes(manifest.total_bytes), time.monotonic() - job.started,
                 self.store.url)
        entries = {(manifest.step, name): entry for name, entry in manifest.files.items()}
        entries.update({(ref.step, ref.name): FileEntry(ref.size, ref.checksum)
                        for ref in manifest.refs})
        self._ref_entries = entries
        if observed is not None:
            self._tracker.commit(observed, locations)
        self._after_commit_hook(manifest)

    def _write(self, key: str, make_chunks: Callable[[], Iterable[memoryview]]) -> FileEntry:
        """Write one file, checksummed on the fly; a store may retry it (re-iterable)."""
        chunks = HashedChunks(make_chunks)
        self.store.write(key, chunks)
        return chunks.entry()


def _state_json(tree: dict, unchanged: dict[str, Location]) -> bytes:
    """The state file: the tree, and where tensors not rewritten by this save are.

    Raises:
        ValueError: over the size restore reads (it would be refused on reading).
    """
    raw = json.dumps({"tree": tree, "tensor_refs": {
        name: [loc.step, loc.file, loc.name] for name, loc in unchanged.items()}},
        separators=(",", ":")).encode()
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError(f"the state's non-tensor part is {len(raw)} bytes of JSON, over the "
                         f"{MAX_STATE_BYTES}-byte limit restore reads; keep large data in "
                         f"tensors or numpy arrays")
    return raw
