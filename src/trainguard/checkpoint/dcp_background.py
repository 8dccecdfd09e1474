"""The background half of a sharded save: stage on the caller's thread, write and commit
in DCP's.

:func:`start_save_state_sharded` goes through DCP's ``async_save`` with trainguard's
:class:`~trainguard.checkpoint.dcp.TrainguardWriter`: the call returns once this
rank's tensors are copied into host memory (a :class:`HostStager`: the single-process
manager's ``HostArena``, reused from save to save); DCP's plan exchange, every rank's
write and the coordinator's commit (manifest last, only after every rank succeeded) run in
DCP's background thread, on the given process group.

Invariants:

* A :class:`ShardedSave` ends the same way on every rank: DCP gathers every rank's
  result to the coordinator and broadcasts its verdict, so either every rank's save
  committed or every rank's raised (a rank that died makes its peers' collectives fail).
* Nothing stages into the host memory, and nothing else runs a collective on the process
  group, while a save is in flight: the caller joins it first (the run layer's
  ``DistributedManager`` does, before every save, restore and step broadcast).
* A failure is logged at once, kept, and raised by ``wait()``; ``error_reported`` tells
  the caller's manager it was raised once already. DCP's background thread is a
  ``ThreadPoolExecutor`` worker, which a normal interpreter exit waits for.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from trainguard.checkpoint.catalog import CheckpointInfo
from trainguard.checkpoint.dcp import TrainguardWriter, prepare_save
from trainguard.checkpoint.format import Manifest, step_dir
from trainguard.checkpoint.snapshot import HostArena
from trainguard.checkpoint.writer import SaveHandle
from trainguard.errors import CheckpointError
from trainguard.store import Store

log = logging.getLogger("trainguard.checkpoint")

# dcp.async_save takes a custom stager from torch 2.6 on; before, sharded saves block.
_ASYNC_STAGER = "async_stager" in inspect.signature(dcp.async_save).parameters
if not _ASYNC_STAGER:
    log.info("torch %s: dcp.async_save takes no stager; sharded saves are synchronous",
             torch.__version__)


def start_save_state_sharded(store: Store, step: int, state: dict, stager: HostStager, *,
                             metrics: dict | None = None, tags: dict[str, str] | None = None,
                             reason: str = "periodic", process_group: Any = None,
                             on_commit: Callable[[Manifest], None] | None = None) -> ShardedSave:
    """``dcp.save_state_sharded`` in the background: returns once staged.

    From the return on, the caller may change every tensor of ``state``: this rank's
    shards are in ``stager``'s host memory. DCP's plan exchange (collectives on
    ``process_group``), the writes and the coordinator's commit run in DCP's background
    thread. The caller must let that save finish (``ShardedSave.join``) before staging
    again into the same ``stager`` or running another collective on ``process_group``.

    Raises:
        TypeError: the state holds a value that cannot be saved without pickle.
    """
    started = time.monotonic()
    tensors, state_json, make_manifest = prepare_save(step, state, metrics, tags, reason)
    writer = TrainguardWriter(store, step, make_manifest, state_json, on_commit)
    if _ASYNC_STAGER:
        future = dcp.async_save(tensors, storage_writer=writer, planner=DefaultSavePlanner(),
                                process_group=process_group, async_stager=stager,
                                no_dist=process_group is None)
    else:  # older torch: the same save, synchronously, behind the same interface
        future = concurrent.futures.Future()
        try:
            dcp.save(tensors, storage_writer=writer, planner=DefaultSavePlanner(),
                     process_group=process_group, no_dist=process_group is None)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            future.set_exception(exc)
        else:
            future.set_result(None)
    return ShardedSave(step, store.url, writer, future, started, time.monotonic() - started)


class HostStager(AsyncStager):
    """DCP's staging step on trainguard's :class:`HostArena`: one host buffer, reused
    from save to save (grown when the state grows; pinned when tensors live on a GPU).

    ``stage`` returns once every copy is complete, so the caller may change its tensors
    right after. A DTensor is staged as a DTensor of the same placements whose local
    shard is the host copy. The next ``stage`` overwrites the copies in place: never
    stage while a write still reads them.
    """

    _synchronize_after_execute = False  # stage() has synchronized already

    def __init__(self) -> None:
        self._arena = HostArena()

    @torch.no_grad()
    def stage(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of ``state_dict``'s tensors (the flat dict a save hands to DCP)."""
        local = {name: _local(tensor) for name, tensor in state_dict.items()}
        pin = any(t.device.type == "cuda" for t in local.values())
        self._arena.reset(HostArena.bytes_needed(list(local.values())), pin)
        staged = {}
        for name, tensor in state_dict.items():
            copy = self._arena.copy(local[name])
            # DTensor.from_local would move the copy back to the mesh's device: keep the
            # spec (placements, global shape) with the host shard, as DCP's own stager does.
            staged[name] = DTensor(copy, tensor._spec, requires_grad=False) \
                if isinstance(tensor, DTensor) else copy
        self._arena.synchronize()  # queued device-to-host copies: complete from here
        return staged

    def synchronize_staging(self) -> None:
        """Nothing to wait for: :meth:`stage` returns with its copies complete."""

    def close(self) -> None:
        """Free the host buffer (unpinned first)."""
        self._arena.release()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedSave(SaveHandle):
    """A sharded save whose write and commit run in DCP's background thread.

    Every rank holds one. It ends the same way on every rank: committed (``wait()`` gives
    the checkpoint's info; its manifest is None on ranks other than the coordinator) or
    failed with the exception DCP raised on every rank (logged at once, raised by
    ``wait()``). ``error_reported`` records that it was raised to the caller once.
    """

    def __init__(self, step: int, url: str, writer: TrainguardWriter,
                 future: concurrent.futures.Future, started: float,
                 stall_seconds: float) -> None:
        super().__init__(step, stall_seconds=stall_seconds)
        self._url, self._writer, self._started = url, writer, started
        self.error: BaseException | None = None
        self.error_reported = False
        self.finished_at: float | None = None
        self._finished = threading.Event()  # set once error/finished_at are final
        future.add_done_callback(self._on_done)

    def _on_done(self, future: concurrent.futures.Future) -> None:
        self.error, self.finished_at = future.exception(), time.monotonic()
        if self.error is not None:  # logged at once; raised by wait() or the manager
            log.error("sharded save of step %d failed: %s (nothing is committed; the "
                      "previous checkpoint is still the latest valid one)", self.step,
                      describe_failure(self.error))
        elif self._writer.manifest is not None:
            log.info("committed sharded step %d (%d files, %.2f s) to %s", self.step,
                     len(self._writer.manifest.files), self.finished_at - self._started,
                     self._url)
        self._finished.set()

    @property
    def skipped(self) -> bool:
        return False

    def done(self) -> bool:
        """Whether the save has finished (committed or failed) on this rank."""
        return self._finished.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the end without raising; False when ``timeout`` ran out first."""
        return self._finished.wait(timeout)

    def wait(self, timeout: float | None = None):
        """Block until committed; returns the checkpoint's info.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            CheckpointError: a rank failed; nothing is committed (the cause is chained).
        """
        if not self.join(timeout):
            raise TimeoutError(f"save of step {self.step} still running after {timeout} s")
        if self.error is not None:
            self.error_reported = True
            raise CheckpointError(f"sharded save of step {self.step} failed: "
                                  f"{describe_failure(self.error)}") from self.error
        return CheckpointInfo(self.step, step_dir(self.step), self._writer.manifest)

    @property
    def seconds_to_durable(self) -> float | None:
        """Seconds from the ``save`` call to the commit (None until committed)."""
        if not self.done() or self.error is not None:
            return None
        return self.finished_at - self._started


def describe_failure(error: BaseException) -> str:
    """One line naming each failed rank and its error (DCP's ``CheckpointException``
    prints a whole traceback per rank)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {pair[0]!r}" for rank, pair in sorted(failures.items()))
    return repr(error)
