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
  ``torch.distributed.checkpoint`` (:mod:`trainguard.checkpoint.dcp`); ``save``
  returns once this rank's shards are copied to host memory, then each rank writes its
  shards in the background and rank 0 commits after all succeeded (and hands the commit
  to the mirror, with two tiers). Restore reshards to the live placements, whatever the
  world size at save time, from the primary or (two tiers) the mirror.

Checkpoint collectives (the step broadcast, DCP's plan/gather) run on their own gloo
process group, created here, so they never interleave with the training collectives of
the default (NCCL) group. A background sharded save runs collectives on that group from
DCP's thread; at most one is in flight, and this thread joins it before any other use of
the group (the next save, a restore), so the two never interleave. A failed background
save is raised once, on every rank alike, by the next ``save``, ``wait`` or ``close``.

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
from trainguard.checkpoint.format import is_sharded
from trainguard.checkpoint.tree import flatten
from trainguard.checkpoint.writer import FailedSaves
from trainguard.errors import CheckpointCorrupt, CheckpointNotFound, StateMismatch
from trainguard.store.base import Refreshable

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
            f"this process is one of WORLD_SIZE={os.environ['WORLD_SIZE']} (started by "
            f"torchrun) but torch.distributed is not initialized: call "
            f"torch.distributed.init_process_group() before opening the Run, so the ranks "
            f"can agree on what to save and restore")
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


class DistributedManager:
    """The checkpoint manager of one rank of a multi-process run (see module docs).

    It implements :class:`~trainguard.checkpoint.ManagerInterface`, as the one-process
    :class:`CheckpointManager` does, so the Run drives both the same way.

    Args:
        manager: this rank's :class:`CheckpointManager` on the shared run store (only
            rank 0's takes the writer lock and applies retention).
        timeout: seconds a checkpoint collective waits for the slowest rank.
    """

    if_busy = "wait"

    def __init__(self, manager: CheckpointManager, timeout: float | None = None) -> None:
        import torch.distributed as dist

        # DCP (seconds of imports) loads in multi-process runs only, never in one process
        from trainguard.checkpoint.dcp_background import HostStager

        self.inner = manager
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        seconds = timeout or float(os.environ.get(CKPT_TIMEOUT_ENV, _DEFAULT_TIMEOUT))
        # Every rank creates it at the same point (opening the Run): a collective.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
        self._stager = HostStager()
        self._saves = FailedSaves()  # the sharded save in flight; a failure not raised yet

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

    def prepare(self, state: dict) -> None:
        """Nothing to reserve ahead: DCP's stager allocates on the first save.

        (Replicated saves go through rank 0's manager, whose first save allocates too:
        a reservation here would hold host memory that a sharded state never uses.)
        """

    def _drain(self) -> None:
        """Wait for the in-flight sharded save; keep its error for the next raising call.

        Its collectives on ``self.group`` end with it: call this before any other use of
        the group from this thread.
        """
        self._saves.drain()

    def _raise_pending(self) -> None:
        from trainguard.checkpoint.dcp_background import describe_failure

        self._saves.raise_pending(
            lambda save: f"sharded save of step {save.step} failed in the background: "
                         f"{describe_failure(save.error)}; nothing of it is committed")

    def wait(self) -> None:
        """Wait for the in-flight save (sharded: this rank's; replicated: rank 0's).

        Raises:
            CheckpointError: a background save failed since the last raising call
                (sharded: on every rank alike).
        """
        self._raise_pending()
        if self.coordinator:
            self.inner.wait()

    def close(self) -> None:
        """Finish the in-flight save, then (rank 0) its upload, and release the lock.

        Raises:
            CheckpointError: a background save failed (everything is closed anyway).
        """
        try:
            self._raise_pending()
        finally:
            self._stager.close()
            self.inner.close()

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint directory (this rank's view of the shared store)."""
        self._drain()
        return self.inner.list()

    def latest_valid(self, resumable: bool = False) -> CheckpointInfo | None:
        """The newest valid checkpoint (this rank's view of the shared store)."""
        self._drain()
        return self.inner.latest_valid(resumable)

    def verify(self, step: int) -> CheckpointInfo:
        """Check every byte of the checkpoint at ``step``."""
        self._drain()
        return self.inner.verify(step)

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: dict, metrics: dict | None = None, *,
             tags: dict[str, str] | None = None, reason: str = "periodic",
             blocking: bool = False) -> SaveHandle:
        """Save ``step``: rank 0 alone (replicated) or every rank's shards (sharded).

        Every rank calls it at the same steps (the Run's step cadence guarantees it). A
        sharded save returns once this rank's shards are in host memory (``blocking``:
        once committed); the previous one is waited for first. ``error`` saves are
        skipped (see below); in sharded mode ``preempted`` ones too.

        Raises:
            CheckpointError: the previous background sharded save failed (raised once,
                on every rank), or (``blocking``) this one did.
        """
        from trainguard.checkpoint.dcp_background import start_save_state_sharded

        if reason == "error":
            # Under torchrun an error is most often a peer that died mid-step: this rank's
            # state is then half a step (RNG drawn, no update), not worth resuming from.
            log.warning("not saving step %d after an error: in a distributed run the state "
                        "may be mid-step; the newest commit stays", step)
            return SaveHandle(step)
        # The previous sharded save ends on every rank alike, so every rank raises here
        # or none does: no rank starts a collective its peers skip.
        self._raise_pending()
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
        self.inner.wait()  # nothing of rank 0's own in flight (e.g. a replicated save)
        handle = start_save_state_sharded(self.store, step, state, self._stager,
                                          metrics=metrics, tags=tags, reason=reason,
                                          process_group=self.group,
                                          on_commit=self._after_commit)
        self._saves.inflight = handle
        if blocking:
            handle.wait()
        return handle

    def _refresh(self) -> None:
        """See the files other nodes committed (a Modal volume: ``reload()``); each node
        of a cluster otherwise sees only its own, and every other rank's shard looks
        missing."""
        if isinstance(self.store, Refreshable):
            self.store.refresh()

    def _after_commit(self, manifest: Any) -> None:
        """Rank 0, in DCP's background thread, right after the commit: what follows every
        commit (the upload, retention), on a refreshed view of the store."""
        try:
            self._refresh()
        except Exception as exc:  # retention on a stale view would delete
            log.warning("step %d committed, but neither retention nor the upload ran: %s",
                        manifest.step, exc)
            return
        self.inner.committed(manifest)

    # -- restoring -------------------------------------------------------------------------

    def restore(self, state: dict, step: int | None = None) -> int:
        """Restore the same step on every rank; returns it (a collective).

        Raises:
            CheckpointNotFound: nothing valid to restore (on every rank).
            StateMismatch, CheckpointCorrupt: as :meth:`CheckpointManager.restore`.
        """
        self._drain()  # no background collective may interleave with the restore's
        try:
            self._refresh()  # files written on other nodes (rank 0's, other ranks' shards)
        except Exception as exc:  # what this node sees may still do
            log.warning("restoring from this node's view of %s: %s", self.store.url, exc)
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
        from torch.distributed.checkpoint.api import CheckpointException

        from trainguard.checkpoint.dcp import restore_state_sharded
        from trainguard.checkpoint.dcp_background import describe_failure

        # Rank 0 picks the candidates, (step, tier) newest first, so every rank reads the
        # same checkpoint from the same tier (the mirror's when the primary lost it).
        candidates = None
        if self.coordinator:
            candidates = [(i.step, i.tier) for i in self.inner.candidates()
                          if i.valid and step in (None, i.step)]
            if step is not None and not candidates:
                candidates = [(step, "primary")]  # not found below, on every rank alike
        candidates = self._broadcast(candidates)
        failure: BaseException | None = None
        for candidate, tier in candidates:
            manager = self.inner.remote if tier == "mirror" else self.inner
            info = next((i for i in manager.list() if i.step == candidate), None)
            if info is None or not info.valid:
                raise CheckpointNotFound(f"no valid checkpoint at step {candidate}")
            if not is_sharded(info.manifest):
                raise StateMismatch(f"{info.key} is not sharded but the state holds DTensors; "
                                    f"restore it in one process and save it sharded")
            try:
                restored = restore_state_sharded(manager.store, state, candidate,
                                                 info.manifest, process_group=self.group)
            except (Exception, CheckpointException) as exc:  # raised on every rank alike
                failure = exc  # with step=N, the next candidate is the mirror's copy of N
                log.warning("skipping sharded checkpoint step %d (%s copy): %s", candidate,
                            tier, describe_failure(exc))
                continue
            log.info("restored sharded step %d from %s", restored, manager.store.url)
            return restored
        if step is not None and failure is not None:
            raise failure
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
