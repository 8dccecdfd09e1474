"""``CheckpointManager``: snapshot -> write -> checksum -> manifest -> commit -> retention.

Invariants (each one is tested):

* The manifest is written last and the store committed right after: a checkpoint exists
  for readers exactly when its manifest does. A process killed at any instant leaves at
  worst a manifest-less directory, which every reader ignores.
* Nothing is loaded before every file of the checkpoint has been read and its size and
  checksum verified; a corrupt checkpoint is skipped with a warning naming the file.
* Retention deletes the manifest of a checkpoint first (un-committing it), then its files;
  it never deletes the newest valid checkpoint nor the one just written.
* One writer per run directory (a lock file, taken on the first save or gc).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from trainguard.checkpoint.format import (
    CHECKPOINTS_DIR,
    MANIFEST,
    STATE_FILE,
    FileEntry,
    Hasher,
    Manifest,
    checksum,
    parse_safetensors,
    parse_step_dir,
    plan_shards,
    step_dir,
)
from trainguard.checkpoint.retention import RetentionPolicy
from trainguard.checkpoint.tree import flatten, restore_into
from trainguard.errors import (
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointNotFound,
    StateMismatch,
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
        manifest: the parsed manifest, or None when missing/unreadable.
        problem: None when the checkpoint is valid, else why it is not.
    """

    step: int
    key: str
    manifest: Manifest | None
    problem: str | None = None

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
    def reason(self) -> str:
        return self.manifest.reason if self.manifest else "unknown"

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes if self.manifest else 0


class SaveHandle:
    """The result of :meth:`CheckpointManager.save`; ``wait()`` returns the committed info.

    Saves are synchronous in this version, so a handle is complete when returned; the
    handle exists so that asynchronous saves need no change in calling code.
    """

    def __init__(self, info: CheckpointInfo) -> None:
        self._info = info

    def done(self) -> bool:
        """Whether the save has committed."""
        return True

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """Block until committed; returns the checkpoint's info."""
        return self._info


def _versions() -> dict[str, str]:
    import safetensors

    from trainguard import __version__

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


def _hashed(chunks: Iterable[memoryview], hasher: Hasher) -> Iterator[memoryview]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


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
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if keep is not None and not callable(keep):
            raise TypeError(f"keep must be a retention policy such as keep_last(3), got {keep!r}")
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.store = open_store(store)
        self.keep = keep
        self.max_shard_bytes = max_shard_bytes
        self._lock = None

    # -- lifecycle -----------------------------------------------------------------------

    def _acquire_writer(self) -> None:
        if self._lock is None:
            make_lock = getattr(self.store, "lock", None)
            if make_lock is None:
                return
            self._lock = make_lock(LOCK_NAME)
        self._lock.acquire()

    def close(self) -> None:
        """Release the writer lock (saves are already committed when they return)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- saving --------------------------------------------------------------------------

    def save(self, step: int, state: dict, metrics: dict | None = None, *,
             tags: dict[str, str] | None = None, reason: str = "periodic") -> SaveHandle:
        """Write ``state`` as the checkpoint of ``step`` and commit it.

        Args:
            step: training step (non-negative int); one checkpoint per step.
            state: dict of modules, optimizers, schedulers, tensors, JSON-able values...
            metrics: numbers recorded in the manifest (used by ``keep_best``).
            tags: free-form strings recorded in the manifest.
            reason: why this save happens ("periodic", "final", "preempted", "error").

        Returns:
            A handle whose ``wait()`` gives the committed :class:`CheckpointInfo`.

        Raises:
            CheckpointExists: a committed checkpoint already holds ``step``.
            LockHeld: another process writes this run directory.
            TypeError: the state holds a value that cannot be saved without pickle.
        """
        key = step_dir(step)
        metrics = _clean_metrics(metrics)
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._acquire_writer()
        if self.store.exists(f"{key}/{MANIFEST}"):
            raise CheckpointExists(
                f"step {step} is already committed at {self.store.url}/{key}; "
                f"save under a new step, or delete that checkpoint first"
            )
        started = time.monotonic()
        tree, tensors = flatten(state)
        for stale in self.store.list(key):  # leftovers of an interrupted save of this step
            self.store.delete(stale)
        files = {}
        for shard in plan_shards(tensors, self.max_shard_bytes):
            files[shard.name] = self._write(f"{key}/{shard.name}", shard.chunks())
        state_json = json.dumps(tree, separators=(",", ":")).encode()
        files[STATE_FILE] = self._write(f"{key}/{STATE_FILE}", [memoryview(state_json)])
        manifest = Manifest(step=step, created_at=time.time(), files=files, metrics=metrics,
                            tags=tags, reason=reason, versions=_versions())
        # The manifest is written last and committed at once: its presence is the commit.
        self.store.write(f"{key}/{MANIFEST}", manifest.to_bytes())
        self.store.commit()
        seconds = time.monotonic() - started
        log.info("committed step %d (%s, %.2f s) to %s", step,
                 human_bytes(manifest.total_bytes), seconds, self.store.url)
        info = CheckpointInfo(step, key, manifest)
        if self.keep is not None:
            self._apply_retention(self.keep, protect={step})
        return SaveHandle(info)

    def _write(self, key: str, chunks: Iterable[memoryview]) -> FileEntry:
        hasher = Hasher()
        self.store.write(key, _hashed(chunks, hasher))
        return FileEntry(hasher.size, hasher.hexdigest())

    # -- reading -------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory, oldest first, each marked valid or with its problem.

        This is a cheap check (manifest parses, files present with the recorded sizes);
        :meth:`verify` also checks every byte.
        """
        by_step: dict[int, list[str]] = {}
        for key in self.store.list(CHECKPOINTS_DIR):
            parts = key.split("/")
            if len(parts) < 3:
                continue
            step = parse_step_dir(parts[1])
            if step is not None:
                by_step.setdefault(step, []).append("/".join(parts[2:]))
        return [self._inspect(step, names) for step, names in sorted(by_step.items())]

    def _inspect(self, step: int, names: list[str]) -> CheckpointInfo:
        key = step_dir(step)
        if MANIFEST not in names:
            return CheckpointInfo(step, key, None, "incomplete: no manifest (the save was "
                                                   "interrupted before its commit)")
        try:
            manifest = Manifest.from_bytes(self.store.read(f"{key}/{MANIFEST}"),
                                           f"{key}/{MANIFEST}")
        except CheckpointCorrupt as exc:
            return CheckpointInfo(step, key, None, str(exc))
        if manifest.step != step:
            return CheckpointInfo(step, key, manifest,
                                  f"manifest says step {manifest.step}, directory says {step}")
        present = set(names)
        for name, entry in manifest.files.items():
            if name not in present:
                return CheckpointInfo(step, key, manifest, f"{name}: missing")
            size = self.store.size(f"{key}/{name}")
            if size != entry.size:
                return CheckpointInfo(step, key, manifest,
                                      f"{name}: size {size} bytes, manifest says {entry.size}")
        return CheckpointInfo(step, key, manifest)

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint that passes the cheap check, or None."""
        for info in reversed(self.list()):
            if info.valid:
                return info
        return None

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
        files = info.manifest.files
        buffers = {}
        # Files are read two at a time while this thread checks the ones already read,
        # so checksumming overlaps I/O instead of following it.
        with ThreadPoolExecutor(2, thread_name_prefix="trainguard-restore") as pool:
            reads = {name: pool.submit(self.store.read, f"{info.key}/{name}") for name in files}
            for name, future in reads.items():
                try:
                    data = future.result()
                except FileNotFoundError:
                    raise CheckpointCorrupt(f"{info.key}/{name}: missing") from None
                _check_file(f"{info.key}/{name}", data, files[name])
                buffers[name] = data
        if STATE_FILE not in buffers:
            raise CheckpointCorrupt(f"{info.key}: manifest lists no {STATE_FILE}")
        try:
            tree = json.loads(bytes(buffers.pop(STATE_FILE)))
        except ValueError as exc:
            raise CheckpointCorrupt(f"{info.key}/{STATE_FILE}: not valid JSON ({exc})") from exc
        tensors: dict[str, torch.Tensor] = {}
        for name, data in buffers.items():
            tensors.update(parse_safetensors(data, f"{info.key}/{name}"))
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
            candidates = list(reversed(self.list()))
        skipped = []
        for info in candidates:
            try:
                if not info.valid:
                    raise CheckpointCorrupt(f"{info.key}: {info.problem}")
                tree, tensors = self._read_verified(info)
            except CheckpointCorrupt as exc:
                if step is not None:
                    raise
                log.warning("skipping checkpoint step %d: %s", info.step, exc)
                skipped.append(info.step)
                continue
            if not isinstance(tree, dict):
                raise StateMismatch(f"{info.key}/{STATE_FILE}: top level is not a dict")
            restore_into(state, tree, tensors)
            log.info("restored step %d from %s", info.step, self.store.url)
            return info.step
        detail = f" (skipped unusable steps: {skipped})" if skipped else ""
        raise CheckpointNotFound(f"no valid checkpoint to restore in {self.store.url}{detail}")

    # -- retention -----------------------------------------------------------------------

    def gc(self, policy: RetentionPolicy, *, dry_run: bool = False) -> list[CheckpointInfo]:
        """Delete what ``policy`` does not keep (and interrupted saves); returns those.

        Raises:
            LockHeld: a live writer owns the run directory (its own policy applies).
        """
        if not dry_run:
            self._acquire_writer()
        return self._apply_retention(policy, protect=set(), dry_run=dry_run)

    def _apply_retention(self, policy: RetentionPolicy, protect: set[int],
                         dry_run: bool = False) -> list[CheckpointInfo]:
        infos = self.list()
        valid = [c for c in infos if c.valid]
        keep = set(policy(valid)) | protect
        if valid:
            keep.add(valid[-1].step)  # never delete the newest valid checkpoint
        doomed = [c for c in infos if c.step not in keep]
        for info in doomed:
            why = "not kept by policy" if info.valid else info.problem
            log.info("%s checkpoint step %d (%s)", "would delete" if dry_run else "deleting",
                     info.step, why)
            if not dry_run:
                self._delete(info)
        if not dry_run and hasattr(self.store, "remove_temp_files"):
            self.store.remove_temp_files(CHECKPOINTS_DIR)
        return doomed

    def _delete(self, info: CheckpointInfo) -> None:
        keys = self.store.list(info.key)
        manifest = f"{info.key}/{MANIFEST}"
        if manifest in keys:  # un-commit first: a crash mid-delete leaves no half checkpoint
            self.store.delete(manifest)
            self.store.commit()
        for key in keys:
            if key != manifest:
                self.store.delete(key)
        self.store.commit()


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
