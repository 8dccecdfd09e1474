"""``CheckpointManager``: snapshot -> write -> checksum -> manifest -> commit -> retention.

``save`` blocks only for the snapshot (tensors copied into reusable host memory); writing,
checksumming (on the fly), the manifest, the commit and retention run in a background
thread (``saving.SaveJob``). At most one save is in flight.

Invariants (each one is tested):

* The manifest is written last and the store committed right after: a checkpoint exists
  for readers exactly when its manifest does. A process killed at any instant leaves at
  worst a manifest-less directory, which every reader ignores.
* A save never changes a file a committed manifest names, nor replaces a manifest: its
  files carry a token of its own, and its manifest is created if absent. So a writer
  that lost the run to another one (an object-store lease taken over while it was
  frozen) cannot tear the other's checkpoints; it also checks its lease right before
  publishing and before retention deletes anything, so it stops there.
* Nothing is loaded before every file of the checkpoint has been read and its size and
  checksum verified; a corrupt checkpoint is skipped with a warning naming the file.
* Retention deletes the manifest of a checkpoint first (un-committing it), then its files;
  it never deletes the newest valid checkpoint nor the one just written.
* One writer per run directory (a lock file, taken on the first save or gc).
* Files of a deleted checkpoint that a kept incremental checkpoint still reads from stay
  (the directory is marked retired) until nothing references them.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from trainguard._units import human_bytes
from trainguard.checkpoint.format import (
    CHECKPOINTS_DIR,
    MANIFEST,
    RETIRED,
    STATE_FILE,
    FileEntry,
    FileRef,
    HashedChunks,
    Manifest,
    ShardPlan,
    checksum,
    member_name,
    new_writer,
    parse_safetensors,
    parse_step_dir,
    plan_shards,
    read_manifest,
    step_dir,
)
from trainguard.checkpoint.mirror import Mirror
from trainguard.checkpoint.retention import RetentionPolicy, keep_best
from trainguard.checkpoint.saving import FailedSaves, FinalPieces, SaveHandle, SaveJob
from trainguard.checkpoint.schema import MAX_STATE_BYTES
from trainguard.checkpoint.snapshot import ChangeTracker, HostArena, Location
from trainguard.checkpoint.tree import (
    check_tree,
    flatten_with_fresh,
    parse_state_file,
    restore_into,
)
from trainguard.errors import (
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointNotFound,
    StateMismatch,
    StoreError,
    UnsafePath,
)
from trainguard.store import Store, open_store

log = logging.getLogger("trainguard.checkpoint")

LOCK_NAME = ".trainguard.lock"
DEFAULT_MAX_SHARD_BYTES = 512 << 20


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about one checkpoint directory.

    Attributes:
        step: the step in the directory name.
        key: the store key of the directory.
        manifest: the parsed ``manifest.json`` as a :class:`~trainguard.checkpoint.format.
            Manifest` (attributes, not a dict: ``.metrics``, ``.tags``, ``.reason``,
            ``.created_at``, ``.files``, ``.versions``), or None when missing/unreadable.
            ``info.metrics``, ``info.tags``, ``info.reason`` read the same fields and
            work without a manifest too.
        problem: None when the checkpoint is valid, else why it is not.
    """

    step: int
    key: str
    manifest: Manifest | None
    problem: str | None = None
    tier: str = "primary"  # or "mirror": the remote copy of a two-tier manager

    @property
    def valid(self) -> bool:
        """True when the manifest parsed and every file checked out."""
        return self.problem is None and self.manifest is not None

    @property
    def created_at(self) -> float:
        return self.manifest.created_at if self.manifest else 0.0

    @property
    def metrics(self) -> dict:
        return self.manifest.metrics if self.manifest else {}

    @property
    def tags(self) -> dict:
        return self.manifest.tags if self.manifest else {}

    @property
    def reason(self) -> str:
        return self.manifest.reason if self.manifest else "unknown"

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes if self.manifest else 0


def _versions() -> dict[str, str]:
    import safetensors

    from trainguard._version import __version__

    return {"trainguard": __version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _clean_metrics(metrics: dict | None) -> dict[str, float]:
    out = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
        out[str(name)] = float(value)
    return out


def _check_file(where: str, data: memoryview, entry: FileEntry) -> None:
    if len(data) != entry.size:
        raise CheckpointCorrupt(f"{where}: size {len(data)} bytes, manifest says {entry.size}")
    if checksum(data) != entry.checksum:
        raise CheckpointCorrupt(f"{where}: checksum mismatch (content changed after the "
                                f"commit: disk or copy corruption)")


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


def _resumable(info: CheckpointInfo) -> bool:
    """False for a checkpoint saved mid-step after an error (tag ``resumable=false``)."""
    return info.manifest is None or info.manifest.tags.get("resumable") != "false"


def _sharded(manifest: Manifest) -> bool:
    """Whether the checkpoint was written through torch.distributed.checkpoint."""
    # distributed.DCP_METADATA, not imported: distributed imports torch.distributed
    return manifest.name_of("dcp-metadata.json") in manifest.files


def best_of(infos: Iterable[CheckpointInfo], metric: str,
            mode: str = "min") -> CheckpointInfo | None:
    """The valid checkpoint with the best ``metric``: the one ``keep_best(1, metric,
    mode)`` keeps (error checkpoints and non-finite values never count; the newest wins
    a tie), or None when no valid checkpoint has the metric.

    Raises:
        ValueError: ``mode`` is not "min" or "max", or ``metric`` is empty.
    """
    valid = [info for info in infos if info.valid]
    steps = keep_best(1, metric, mode).keep(valid)
    return next((info for info in valid if info.step in steps), None)


class CheckpointManager:
    """Saves, lists, verifies, restores and prunes the checkpoints of one run.

    Args:
        store: a run directory path, or a :class:`~trainguard.store.Store`.
        keep: retention policy applied after each commit (None keeps everything).
        max_shard_bytes: upper bound of one safetensors file (a bigger tensor gets its own).

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
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if if_busy not in ("wait", "skip"):
            raise ValueError(f"if_busy must be 'wait' or 'skip', got {if_busy!r}")
        self.store = open_store(store)
        self.keep = keep
        self.max_shard_bytes = max_shard_bytes
        self.incremental = incremental
        self.if_busy = if_busy
        self._lock = None
        self._arena = HostArena()
        self._tracker = ChangeTracker()
        self._saves = FailedSaves()  # the save in flight; a failure not raised yet
        self._ref_entries: dict[tuple[int, str], FileEntry] = {}  # files a next save may reuse
        self.mirror_timeout = mirror_timeout
        self.remote: CheckpointManager | None = None
        self._mirror: Mirror | None = None
        if mirror is not None:
            self.remote = CheckpointManager(mirror, max_shard_bytes=max_shard_bytes)
            self._mirror = Mirror(self.store, self.remote.store, after_upload=self._remote_retention)

    # -- lifecycle -----------------------------------------------------------------------

    def acquire_writer(self) -> None:
        """Take the run directory's writer lock now (saves and gc take it anyway).

        Raises:
            LockHeld: another live process writes this run directory.
        """
        if self._lock is None:
            make_lock = getattr(self.store, "lock", None)
            if make_lock is None:
                return
            self._lock = make_lock(LOCK_NAME)
        self._lock.acquire()

    def _confirm_writer(self) -> None:
        """Right before publishing or deleting: check this process still owns the run.

        An flock cannot be lost while held; an object-store lease can (its holder frozen
        past the ttl, another taking it over), and this asks the store.

        Raises:
            LockHeld: the run has another writer now; nothing may be written or deleted.
        """
        self.acquire_writer()
        confirm = getattr(self._lock, "confirm", None)
        if confirm is not None:
            confirm()

    def _drain(self) -> None:
        """Wait for the in-flight save; keep its error for the next raising call."""
        self._saves.drain()

    def _raise_pending(self) -> None:
        self._saves.raise_pending(lambda job: f"a background save failed: {job.error!r}")

    def wait(self) -> None:
        """Block until the in-flight save (if any) has committed.

        Raises:
            CheckpointError: a background save failed since the last raising call.
        """
        self._raise_pending()

    def close(self) -> None:
        """Finish the in-flight save and (two tiers) its upload, then release the lock.

        The upload is waited for at most ``mirror_timeout`` seconds; past that an error
        is logged and the remote tier stays at its newest uploaded step.

        Raises:
            CheckpointError: a background save failed (the lock is released anyway).
        """
        try:
            self._raise_pending()
        finally:
            if self._mirror is not None and not self._mirror.close(self.mirror_timeout):
                log.error("upload to %s did not finish within %.0f s; the remote tier's "
                          "newest step is %s", self.remote.store.url, self.mirror_timeout,
                          self._mirror.uploaded_step)
            self._arena.release()  # the host copy of the state (pinned: unpinned first)
            if self.remote is not None:
                self.remote.close()  # its writer lock/lease, taken by remote retention
            if self._lock is not None:
                self._lock.release()

    def tiers(self) -> dict[str, int | None]:
        """Newest valid step of each tier: ``{"primary": 120, "mirror": 100}``."""
        newest = {"primary": _newest(self.list())}
        if self.remote is not None:
            newest["mirror"] = _newest(self._remote_list())
        return newest

    def _remote_list(self) -> list[CheckpointInfo]:
        """The mirror's checkpoints; an unreachable mirror is logged, not fatal."""
        try:
            return self.remote.list() if self.remote is not None else []
        except StoreError as exc:
            log.warning("cannot list the mirror %s (%s); using local checkpoints only",
                        self.remote.store.url, exc)
            return []

    def _remote_retention(self, step: int) -> None:
        if self.keep is not None and self.remote is not None:
            self.remote._apply_retention(self.keep, protect={step})

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
        _, tensors, _ = flatten_with_fresh(state)
        tensors = list(tensors.values())
        self._arena.reserve(HostArena.bytes_needed(tensors),
                            pin=any(t.device.type == "cuda" for t in tensors))

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
        key = step_dir(step)
        metrics = _clean_metrics(metrics)
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        running = self._saves.inflight
        if running is not None and running.is_alive() and self.if_busy == "skip":
            log.info("skipping save of step %d: step %d is still being written",
                     step, running.step)
            return SaveHandle(step)
        self._raise_pending()
        self.acquire_writer()
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
        versions = _versions()

        def make_manifest(files: dict[str, FileEntry]) -> Manifest:
            return Manifest(step=step, created_at=time.time(), files=files, metrics=metrics,
                            tags=tags, reason=reason, versions=versions, refs=refs,
                            writer=writer)

        def on_commit(manifest: Manifest) -> None:
            self._after_commit(job, manifest, observed, locations)

        self._saves.inflight = job
        job.finish(FinalPieces(state_json, member_name(STATE_FILE, writer), make_manifest,
                               on_commit, before_publish=self._confirm_writer))
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
        if not self.store.exists(f"{key}/{MANIFEST}"):
            return
        existing = self.verify(step)
        if existing.valid:
            raise CheckpointExists(
                f"step {step} is already committed at {self.store.url}/{key}; "
                f"save under a new step, or delete that checkpoint first")
        log.warning("replacing checkpoint step %d, which does not verify (%s)", step,
                    existing.problem)
        self._confirm_writer()
        self.store.delete(f"{key}/{MANIFEST}")  # un-commit first, as retention does
        self.store.commit()

    def _stage(self, tensors: dict[str, torch.Tensor], job: SaveJob,
               writer: str) -> list[ShardPlan]:
        """Copy tensors into the host arena, then hand every shard to the job.

        The job starts writing only once the snapshot is complete: on a few cores its
        copying and checksumming would otherwise slow the snapshot, which is the part
        that blocks training (measured: 1.27-1.58x memcpy overlapped, 0.88-1.11x not).
        """
        shards = plan_shards(tensors, self.max_shard_bytes, writer)
        pin = any(t.device.type == "cuda" for t in tensors.values())
        self._arena.reset(HostArena.bytes_needed(list(tensors.values())), pin)
        staged = [ShardPlan(shard.name, [(n, self._arena.copy(t)) for n, t in shard.tensors])
                  for shard in shards]
        self._arena.synchronize()
        for shard in staged:
            job.put(shard)
        return shards

    def _after_commit(self, job: SaveJob, manifest: Manifest, observed: dict | None,
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
        if self._mirror is not None:
            self._mirror.enqueue(manifest.step)
        if self.keep is not None:
            try:
                self._apply_retention(self.keep, protect={manifest.step})
            except Exception as exc:  # a failing delete must not fail a committed save
                log.warning("retention after step %d failed: %r", manifest.step, exc)

    def _write(self, key: str, make_chunks: Callable[[], Iterable[memoryview]]) -> FileEntry:
        """Write one file, checksummed on the fly; a store may retry it (re-iterable)."""
        chunks = HashedChunks(make_chunks)
        self.store.write(key, chunks)
        return chunks.entry()

    # -- reading -------------------------------------------------------------------------

    def _scan(self, drain: bool = True) -> tuple[list[CheckpointInfo], dict[int, list[str]],
                                                 dict[int, list[str]]]:
        """(checkpoint directories, retired directories -> their remaining files, every
        step directory -> the names of its files).

        ``drain`` waits for the in-flight save first; the save thread itself (running
        retention) passes False.
        """
        if drain:
            self._drain()
        by_step: dict[int, list[str]] = {}
        for key in self.store.list(CHECKPOINTS_DIR):
            parts = key.split("/")
            if len(parts) < 3:
                continue
            step = parse_step_dir(parts[1])
            if step is not None:
                by_step.setdefault(step, []).append("/".join(parts[2:]))
        infos, retired = [], {}
        for step, names in sorted(by_step.items()):
            if MANIFEST not in names and RETIRED in names:
                retired[step] = names
            else:
                infos.append(self._inspect(step, names))
        return infos, retired, by_step

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory, oldest first, each marked valid or with its problem.

        This is a cheap check (manifest parses, files present with the recorded sizes);
        :meth:`verify` also checks every byte. Waits for this manager's in-flight save.
        """
        return self._scan()[0]

    def _inspect(self, step: int, names: list[str]) -> CheckpointInfo:
        key = step_dir(step)
        if MANIFEST not in names:
            return CheckpointInfo(step, key, None, "incomplete: no manifest (the save was "
                                                   "interrupted before its commit)")
        try:
            manifest = read_manifest(self.store, f"{key}/{MANIFEST}")
        except FileNotFoundError:
            return CheckpointInfo(step, key, None, "incomplete: no manifest (deleted while "
                                                   "being listed)")
        except CheckpointCorrupt as exc:
            return CheckpointInfo(step, key, None, str(exc))
        if manifest.step != step:
            return CheckpointInfo(step, key, manifest,
                                  f"manifest says step {manifest.step}, directory says {step}")
        present = set(names)
        expected = [(name, f"{key}/{name}", entry.size) for name, entry in manifest.files.items()]
        expected += [(ref.key, ref.key, ref.size) for ref in manifest.refs]
        for label, file_key, size in expected:
            if file_key.startswith(f"{key}/") and label not in present:
                return CheckpointInfo(step, key, manifest, f"{label}: missing")
            try:
                actual = self.store.size(file_key)
            except FileNotFoundError:
                return CheckpointInfo(step, key, manifest, f"{label}: missing")
            except UnsafePath as exc:
                return CheckpointInfo(step, key, manifest, f"{label}: {exc}")
            if actual != size:
                return CheckpointInfo(step, key, manifest,
                                      f"{label}: size {actual} bytes, manifest says {size}")
        return CheckpointInfo(step, key, manifest)

    def best(self, metric: str, mode: str = "min") -> CheckpointInfo | None:
        """The valid checkpoint with the best ``metric`` (``mode`` "min" or "max"), as
        :func:`best_of` picks it; None when no checkpoint recorded the metric.
        ``restore(state, step=mgr.best("val_loss").step)`` loads it.

        Raises:
            ValueError: a bad ``mode`` or an empty ``metric``.
        """
        return best_of(self.list(), metric, mode)

    def latest_valid(self, resumable: bool = False) -> CheckpointInfo | None:
        """The newest checkpoint that passes the cheap check, or None.

        With two tiers, the newer of the primary's and the mirror's (``info.tier``
        says which), so a fresh machine finds the checkpoints in the bucket.

        Args:
            resumable: skip checkpoints saved mid-step after an error (kept for
                inspection): the newest one a resume starts from.
        """
        for info in self._candidates():
            if info.valid and (not resumable or _resumable(info)):
                return info
        return None

    def _candidates(self) -> list[CheckpointInfo]:
        """Checkpoints of every tier, newest first; the primary first at equal steps."""
        infos = list(self.list())
        infos += [replace(i, tier="mirror") for i in self._remote_list()]
        return sorted(infos, key=lambda i: (i.step, i.tier == "primary"), reverse=True)

    def _tier(self, info: CheckpointInfo) -> CheckpointManager:
        return self.remote if info.tier == "mirror" and self.remote is not None else self

    def _info(self, step: int) -> CheckpointInfo:
        for info in self.list():
            if info.step == step:
                return info
        raise CheckpointNotFound(f"no checkpoint at step {step} in {self.store.url}")

    def verify(self, step: int) -> CheckpointInfo:
        """Check every byte of the checkpoint at ``step``; the result's ``problem`` says why
        it is bad (naming the file), or is None when it verifies.

        Raises:
            CheckpointNotFound: there is no directory for ``step``.
        """
        info = self._info(step)
        if not info.valid:
            return info
        try:
            self._read_verified(info)
        except CheckpointCorrupt as exc:
            return CheckpointInfo(info.step, info.key, info.manifest, str(exc))
        return info

    def _read_verified(self, info: CheckpointInfo) -> tuple[Any, dict[str, torch.Tensor]]:
        """Read every file, check sizes and checksums, then parse. Nothing is applied."""
        assert info.manifest is not None
        files = {f"{info.key}/{name}": entry for name, entry in info.manifest.files.items()}
        files.update({ref.key: FileEntry(ref.size, ref.checksum) for ref in info.manifest.refs})
        buffers = {}
        # Files are read two at a time while this thread checks the ones already read,
        # so checksumming overlaps I/O instead of following it.
        with ThreadPoolExecutor(2, thread_name_prefix="trainguard-restore") as pool:
            reads = {key: pool.submit(self.store.read, key) for key in files}
            for key, future in reads.items():
                try:
                    data = future.result()
                except FileNotFoundError:
                    raise CheckpointCorrupt(f"{key}: missing") from None
                except UnsafePath as exc:
                    raise CheckpointCorrupt(f"{key}: {exc}") from None
                _check_file(key, data, files[key])
                buffers[key] = data
        if _sharded(info.manifest):  # its tensors load through DCP (restore_state_sharded)
            from trainguard.checkpoint.distributed import read_tree

            read_tree(self._tier(info).store, info.step, info.manifest)  # the tree's schema
            return None, {}
        state_key = f"{info.key}/{info.manifest.state_file}"
        if state_key not in buffers:
            raise CheckpointCorrupt(f"{info.key}: manifest lists no state file "
                                    f"({info.manifest.state_file})")
        tree, tensor_refs = parse_state_file(buffers.pop(state_key), state_key)
        by_file = {key: parse_safetensors(data, key) for key, data in buffers.items()}
        tensors: dict[str, torch.Tensor] = {}
        for key, found in by_file.items():
            if key.startswith(f"{info.key}/"):
                tensors.update(found)
        for name, (ref_step, ref_file, ref_name) in tensor_refs.items():
            ref_key = f"{step_dir(ref_step)}/{ref_file}"
            try:
                tensors[name] = by_file[ref_key][ref_name]
            except KeyError:
                raise CheckpointCorrupt(f"{state_key}: tensor {name!r} refers to {ref_key}, "
                                        f"which the manifest does not list or lacks it") from None
        check_tree(tree, state_key, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
        return tree, tensors

    def restore(self, state: dict, step: int | None = None) -> int:
        """Load a checkpoint into ``state`` in place; returns the restored step.

        With ``step=None`` the newest checkpoint that fully verifies is used; corrupt or
        partial ones are skipped with a warning naming the file and the reason.

        Raises:
            CheckpointNotFound: nothing valid to restore (or no checkpoint at ``step``).
            CheckpointCorrupt: the explicitly requested ``step`` does not verify.
            StateMismatch: the checkpoint does not fit ``state`` (shapes, dtypes).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of named objects, got {type(state).__name__}")
        if step is not None:
            candidates = [self._info(step)]
        else:
            candidates = self._candidates()
        skipped = []
        for info in candidates:
            if step is None and not _resumable(info):
                log.info("skipping checkpoint step %d: saved after an error in the middle of "
                         "a step (kept for inspection; restore(step=%d) loads it)",
                         info.step, info.step)
                continue
            try:
                if not info.valid:
                    raise CheckpointCorrupt(f"{info.key}: {info.problem}")
                tree, tensors = self._tier(info)._read_verified(info)
                if tree is None and _sharded(info.manifest):  # one process: reshard to full
                    from trainguard.checkpoint.distributed import restore_state_sharded

                    return restore_state_sharded(self._tier(info).store, state, info.step,
                                                 info.manifest)
            except CheckpointCorrupt as exc:
                if step is not None:
                    raise
                log.warning("skipping checkpoint step %d: %s", info.step, exc)
                skipped.append(info.step)
                continue
            if not isinstance(tree, dict):
                raise StateMismatch(f"{info.key}/{STATE_FILE}: top level is not a dict")
            restore_into(state, tree, tensors)
            log.info("restored step %d from %s", info.step, self._tier(info).store.url)
            return info.step
        detail = f" (skipped unusable steps: {skipped})" if skipped else ""
        raise CheckpointNotFound(f"no valid checkpoint to restore in {self.store.url}{detail}")

    # -- retention -----------------------------------------------------------------------

    def gc(self, policy: RetentionPolicy, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Delete what ``policy`` does not keep (and interrupted saves); returns those.

        Besides the policy, the newest checkpoint that fully verifies is always kept.

        Raises:
            LockHeld: a live writer owns the run directory (its own policy applies).
        """
        self._drain()
        if not dry_run:
            self.acquire_writer()
        # The newest checkpoint that verifies byte for byte is kept whatever the policy
        # says: the cheap check alone could protect a rotten one and delete the good.
        protect = set()
        for info in reversed(self.list()):
            if info.valid and self.verify(info.step).valid:
                protect.add(info.step)
                break
        return self._apply_retention(policy, protect=protect, dry_run=dry_run)

    def _apply_retention(self, policy: RetentionPolicy, protect: set[int],
                         dry_run: bool = False) -> list[CheckpointInfo]:
        # callers have drained, or are the save
        infos, retired, names = self._scan(drain=False)
        valid = [c for c in infos if c.valid]
        keep = set(policy(valid)) | protect
        if valid:
            keep.add(valid[-1].step)  # never delete the newest valid checkpoint...
            resumable = [c for c in valid if _resumable(c)]
            if resumable:
                keep.add(resumable[-1].step)  # ...nor the newest one resume would pick
        # Files of deleted checkpoints that kept (incremental) ones still read from.
        referenced = {(ref.step, ref.name) for c in valid if c.step in keep
                      for ref in c.manifest.refs}
        doomed = [c for c in infos if c.step not in keep]
        for info in doomed:
            why = "not kept by policy" if info.valid else info.problem
            log.info("%s checkpoint step %d (%s)", "would delete" if dry_run else "deleting",
                     info.step, why)
        strays = _strays([c for c in valid if c.step in keep], names, referenced)
        if dry_run or not (doomed or retired or strays):
            return doomed
        self._confirm_writer()  # a writer that lost the run deletes nothing of it
        for info in doomed:
            self._delete(info.key, info.step, referenced)
        for step, _names in retired.items():
            self._delete(step_dir(step), step, referenced)
        for key in strays:  # files of interrupted saves of a step committed since
            self.store.delete(key)
        if strays:
            self.store.commit()
        if hasattr(self.store, "remove_temp_files"):
            self.store.remove_temp_files(CHECKPOINTS_DIR)
        return doomed

    def _delete(self, key: str, step: int, referenced: set[tuple[int, str]]) -> None:
        """Delete a checkpoint directory, keeping files that kept checkpoints reference."""
        keep = {name for s, name in referenced if s == step}
        keys = self.store.list(key)
        manifest = f"{key}/{MANIFEST}"
        if keep:
            if f"{key}/{RETIRED}" not in keys:  # mark before un-committing: never "interrupted"
                self.store.write(f"{key}/{RETIRED}", json.dumps(
                    {"kept_for": "files referenced by later incremental checkpoints"}).encode())
            keep.add(RETIRED)
        if manifest in keys:  # un-commit first: a crash mid-delete leaves no half checkpoint
            self.store.delete(manifest)
            self.store.commit()
        for file_key in keys:
            if file_key != manifest and file_key[len(key) + 1:] not in keep:
                self.store.delete(file_key)
        self.store.commit()


def _strays(kept: list[CheckpointInfo], names: dict[int, list[str]],
            referenced: set[tuple[int, str]]) -> list[str]:
    """Keys in committed, kept step directories that no manifest names: what interrupted
    saves of those steps left (every save names its files uniquely, so they are not a
    committed checkpoint's files, nor can a save in flight write there: its manifest
    could not be created over the committed one)."""
    out = []
    for info in kept:
        own = set(info.manifest.files) | {MANIFEST, RETIRED}
        own |= {name for step, name in referenced if step == info.step}
        out += [f"{info.key}/{name}" for name in names.get(info.step, []) if name not in own]
    return out


def _newest(infos: list[CheckpointInfo]) -> int | None:
    steps = [i.step for i in infos if i.valid]
    return max(steps) if steps else None
