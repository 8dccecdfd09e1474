"""A Run under torchrun: which rank saves what, and how every rank resumes the same step.

:func:`open_manager` gives the Run a :class:`DistributedManager` when the script runs in
an initialized ``torch.distributed`` world of more than one process. It picks a mode per
state, the same on every rank:

* **replicated** (no DTensor in the state: DDP, or every rank holding the same copy):
  rank 0 saves through the ordinary :class:`CheckpointManager` (asynchronous, as in one
  process); the other ranks' saves are no-ops. To resume, rank 0 restores the newest
  checkpoint that verifies and broadcasts its step; every other rank then restores that
  very step, so no rank reads a step that is not committed or a different one.
* **sharded** (any DTensor, e.g. FSDP2): every save is a collective through
  ``torch.distributed.checkpoint`` (:mod:`trainguard.checkpoint.distributed`); each rank
  writes its shards, rank 0 commits after all succeeded; restore reshards to the live
  placements, whatever the world size at save time.

Checkpoint collectives (the step broadcast, DCP's plan/gather) run on their own gloo
process group, created here, so they never interleave with the training collectives of
the default (NCCL) group.

Limits (documented in docs/distributed.md): rank 0's non-tensor state and its copy of
replicated tensors (RNG streams included) are what is saved; ``error`` saves are skipped
(the state of a rank whose peer died is mid-step), and in sharded mode ``preempted`` saves
too, because one rank alone cannot run a collective.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch

from trainguard.checkpoint import CheckpointInfo, CheckpointManager, SaveHandle
from trainguard.checkpoint.distributed import (
    is_sharded,
    restore_state_sharded,
    save_state_sharded,
)
from trainguard.checkpoint.format import step_dir
from trainguard.checkpoint.tree import flatten
from trainguard.errors import CheckpointCorrupt, CheckpointError, CheckpointNotFound, StateMismatch

log = logging.getLogger("trainguard.run")

#: Seconds a checkpoint collective may wait for the slowest rank before failing.
CKPT_TIMEOUT_ENV = "TRAINGUARD_CKPT_TIMEOUT"
_DEFAULT_TIMEOUT = 1800.0


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside ``torch.distributed``.

    Raises:
        RuntimeError: torchrun started this process (``WORLD_SIZE`` > 1) but the script
            has not called ``torch.distributed.init_process_group`` yet.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "this process is one of WORLD_SIZE=%s (started by torchrun) but "
            "torch.distributed is not initialized: call "
            "torch.distributed.init_process_group() before opening the Run, so the ranks "
            "can agree on what to save and restore" % os.environ["WORLD_SIZE"])
    return 0, 1


def open_manager(store: Any, keep: Any = None, mirror: Any = None) -> Any:
    """The Run's checkpoint manager: a :class:`DistributedManager` in a multi-process
    ``torch.distributed`` world, else a plain :class:`CheckpointManager`."""
    manager = store if isinstance(store, CheckpointManager) else \
        CheckpointManager(store, keep=keep, mirror=mirror)
    _rank, size = world()
    return DistributedManager(manager) if size > 1 else manager


def rank_log_dir(root: Any) -> Any:
    """Where this rank's heartbeat and metrics go: the run directory for rank 0 (what the
    launcher watches), ``ranks/rank-NNNNN/`` inside it for the others."""
    rank, size = world()
    if size == 1 or rank == 0:
        return root
    return os.path.join(os.fspath(root), "ranks", f"rank-{rank:05d}")


class ModelOptimizerState:
    """A model and its optimizers as one stateful object, through DCP's ``get_state_dict``.

    Track it (``run.track(app=ModelOptimizerState(model, opt))``) for FSDP2 models: the
    optimizer state is initialized before a restore (so sharded moments load in place)
    and keyed by parameter names, not by position.
    """

    def __init__(self, model: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        self.model, self.optimizers = model, optimizers
        self.optimizer = optimizers[0] if len(optimizers) == 1 else optimizers

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class _Done(SaveHandle):
    """The handle of a save that finished before ``save`` returned (sharded mode)."""

    def __init__(self, step: int, info: CheckpointInfo | None, error: BaseException | None,
                 stall: float) -> None:
        super().__init__(step, stall_seconds=stall)
        self._info, self._error = info, error

    @property
    def skipped(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        if self._error is not None:
            raise CheckpointError(f"save of step {self.step} failed: {self._error!r}") \
                from self._error
        return self._info

    @property
    def seconds_to_durable(self) -> float | None:
        return None if self._error is not None else self.stall_seconds


class DistributedManager:
    """The checkpoint manager of one rank of a multi-process run (see module docs).

    Args:
        manager: this rank's :class:`CheckpointManager` on the shared run store (only
            rank 0's takes the writer lock and applies retention).
        timeout: seconds a checkpoint collective waits for the slowest rank.
    """

    if_busy = "wait"

    def __init__(self, manager: CheckpointManager, timeout: float | None = None) -> None:
        import torch.distributed as dist

        self.inner = manager
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        seconds = timeout or float(os.environ.get(CKPT_TIMEOUT_ENV, _DEFAULT_TIMEOUT))
        # Every rank creates it at the same point (opening the Run): a collective.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))

    @property
    def store(self):
        """The run's store."""
        return self.inner.store

    @property
    def coordinator(self) -> bool:
        """Whether this is rank 0: the one that commits, holds the lock, prunes."""
        return self.rank == 0

    def acquire_writer(self) -> None:
        """Rank 0 takes the run directory's writer lock (the other ranks write under it)."""
        if self.coordinator:
            self.inner.acquire_writer()

    def wait(self) -> None:
        """Wait for rank 0's in-flight save (replicated mode)."""
        if self.coordinator:
            self.inner.wait()

    def close(self) -> None:
        """Finish rank 0's in-flight save and release the lock."""
        self.inner.close()

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory (this rank's view of the shared store)."""
        return self.inner.list()

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest valid checkpoint (this rank's view of the shared store)."""
        return self.inner.latest_valid()

    def verify(self, step: int) -> CheckpointInfo:
        """Check every byte of the checkpoint at ``step``."""
        return self.inner.verify(step)

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: dict, metrics: dict | None = None, *,
             tags: dict[str, str] | None = None, reason: str = "periodic",
             blocking: bool = False) -> SaveHandle:
        """Save ``step``: rank 0 alone (replicated) or every rank's shards (sharded).

        Every rank calls it at the same steps (the Run's step cadence guarantees it). ``error`` saves
        are skipped (see below); in sharded mode ``preempted`` ones too.
        """
        if reason == "error":
            # Under torchrun an error is most often a peer that died mid-step: this rank's
            # state is then half a step (RNG drawn, no update), not worth resuming from.
            log.warning("not saving step %d after an error: in a distributed run the state "
                        "may be mid-step; the newest commit stays", step)
            return SaveHandle(step)
        sharded = _has_dtensor(state)
        if not sharded:
            if not self.coordinator:
                return SaveHandle(step)  # rank 0 writes the one copy
            return self.inner.save(step, state, metrics, tags=tags, reason=reason,
                                   blocking=blocking)
        if reason == "preempted":
            log.warning("not saving step %d (%s): a sharded save is a collective of every "
                        "rank, and this rank may be alone; the newest commit stays", step, reason)
            return SaveHandle(step)
        return self._save_sharded(step, state, metrics, tags, reason)

    def _save_sharded(self, step: int, state: dict, metrics: dict | None,
                      tags: dict[str, str] | None, reason: str) -> SaveHandle:
        import time

        started = time.monotonic()
        self.inner.wait()  # nothing of rank 0's own in flight (e.g. a replicated save)
        try:
            manifest = save_state_sharded(self.store, step, state, metrics=metrics, tags=tags,
                                          reason=reason, process_group=self.group,
                                          on_commit=self._after_commit)
        except Exception as exc:  # raised on every rank alike: nothing is committed
            log.error("sharded save of step %d failed on some rank: %s", step, exc)
            return _Done(step, None, exc, time.monotonic() - started)
        info = CheckpointInfo(step, step_dir(step), manifest)
        return _Done(step, info, None, time.monotonic() - started)

    def _after_commit(self, manifest: Any) -> None:
        if self.inner.keep is not None:
            try:
                self.inner.gc(self.inner.keep)
            except Exception as exc:  # a failing delete must not fail a committed save
                log.warning("retention after step %d failed: %r", manifest.step, exc)

    # -- restoring -------------------------------------------------------------------------

    def restore(self, state: dict, step: int | None = None) -> int:
        """Restore the same step on every rank; returns it (a collective).

        Raises:
            CheckpointNotFound: nothing valid to restore (on every rank).
            StateMismatch, CheckpointCorrupt: as :meth:`CheckpointManager.restore`.
        """
        if _has_dtensor(state):
            return self._restore_sharded(state, step)
        found: list[Any] = [None]
        if self.coordinator:
            try:
                found[0] = self.inner.restore(state, step)
            except (CheckpointNotFound, StateMismatch, CheckpointCorrupt) as exc:
                found[0] = exc
        found = self._broadcast(found[0])
        if isinstance(found, BaseException):
            raise found
        if not self.coordinator:
            self.inner.restore(state, found)
        return found

    def _restore_sharded(self, state: dict, step: int | None) -> int:
        candidates = [step] if step is not None else None
        if self.coordinator and candidates is None:
            candidates = [i.step for i in reversed(self.inner.list()) if i.valid]
        candidates = self._broadcast(candidates)
        for candidate in candidates:
            info = next((i for i in self.inner.list() if i.step == candidate), None)
            if info is None or not info.valid:
                raise CheckpointNotFound(f"no valid checkpoint at step {candidate}")
            if not is_sharded(info.manifest):
                raise StateMismatch(f"{info.key} is not sharded but the state holds DTensors; "
                                    f"restore it in one process and save it sharded")
            try:
                return restore_state_sharded(self.store, state, candidate, info.manifest,
                                             process_group=self.group)
            except Exception as exc:  # DCP raises on every rank alike
                if step is not None:
                    raise
                log.warning("skipping sharded checkpoint step %d: %s", candidate, exc)
        raise CheckpointNotFound(f"no valid checkpoint to restore in {self.store.url}")

    def _broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0),
                                   group=self.group)
        return box[0]


def _has_dtensor(state: dict) -> bool:
    _tree, tensors = flatten(state)
    return any(type(t).__name__ == "DTensor" for t in tensors.values())
