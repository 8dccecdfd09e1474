"""The checkpoint methods ``ckpt_bench.py`` compares, each behind one small interface.

``Method(work)`` owns a directory; ``save(state, step)`` checkpoints a
:class:`BenchState` as ``step`` and returns a :class:`Timing`; ``load(target, step)``
fills another ``BenchState`` from it; ``discard(step)`` frees the disk; ``close()``
releases what the method keeps between saves (trainguard's manager and host arena, DCP's
stager). Methods that keep buffers across saves (``reuses_buffers``) get one warm-up save
first, as in a training loop that saves many times.

The baselines save the flat ``name -> tensor`` dict (model and optimizer tensors, on the
state's device) the way their users do; loading copies into the target's tensors.
trainguard saves ``{"model": model, "optim": optimizer}`` and restores in place.

Timing definitions (all wall clock from the call):

* ``stall_s``: until the training loop may mutate parameters again. Synchronous methods:
  the whole call, so stall == durable.
* ``durable_s``: until the data is fsync'd / committed.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

from trainguard import CheckpointManager
from trainguard.checkpoint.format import step_dir

try:  # torch >= 2.9: stager with async staging, pinned host buffers with CUDA
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
except ImportError:  # pragma: no cover - older torch
    DefaultStager = StagingOptions = None

# DCP without a process group warns on every call (also from its upload thread).
warnings.filterwarnings("ignore", message=".*single process.*")
warnings.filterwarnings("ignore", message=".*pin_memory.*")


@dataclass
class BenchState:
    """What is checkpointed: ``flat`` (every tensor by name) and ``tree`` (the objects)."""

    flat: dict[str, torch.Tensor]
    tree: dict


def copy_into(target: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    """``load_state_dict``'s copy for a flat dict: every loaded tensor into its target."""
    assert target.keys() == loaded.keys(), "loaded keys differ"
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(loaded[key])


@dataclass
class Timing:
    stall_s: float    # the caller may mutate parameters again
    durable_s: float  # the checkpoint is on disk (fsync / commit)
    bytes: int        # bytes this save wrote
    detail: dict = field(default_factory=dict)  # method-specific numbers (JSON only)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Method:
    """A synchronous method: one directory per step, stall == durable == the call."""

    name = "?"
    stall_waits_on = "the call (synchronous: returns once fsync'd)"
    reuses_buffers = False

    def __init__(self, work: Path) -> None:
        self.work = work

    def path(self, step: int) -> Path:
        return self.work / f"step-{step}"

    def save(self, state: BenchState, step: int) -> Timing:
        out = self.path(step)
        start = time.perf_counter()
        self.write(state.flat, out)
        elapsed = time.perf_counter() - start
        return Timing(elapsed, elapsed, dir_bytes(out))

    def write(self, state_dict: dict, out: Path) -> None:
        raise NotImplementedError

    def load(self, target: BenchState, step: int) -> None:
        raise NotImplementedError

    def discard(self, step: int) -> None:
        shutil.rmtree(self.path(step), ignore_errors=True)

    def close(self) -> None:
        pass


class TorchSave(Method):
    name = "torch.save"

    def write(self, state_dict: dict, out: Path) -> None:
        out.mkdir(parents=True)
        with open(out / "model.pt", "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())

    def load(self, target: BenchState, step: int) -> None:
        copy_into(target.flat, torch.load(self.path(step) / "model.pt", weights_only=True,
                                          map_location="cpu"))


class SafeTensors(Method):
    name = "safetensors"

    def write(self, state_dict: dict, out: Path) -> None:
        out.mkdir(parents=True)
        safetensors.torch.save_file(state_dict, str(out / "model.safetensors"))
        fsync_file(out / "model.safetensors")

    def load(self, target: BenchState, step: int) -> None:
        copy_into(target.flat,
                  safetensors.torch.load_file(str(self.path(step) / "model.safetensors")))


class DcpSave(Method):
    """``dcp.save`` without a process group (FileSystemWriter fsyncs by default)."""

    name = "dcp save"

    def write(self, state_dict: dict, out: Path) -> None:
        dcp.save(state_dict, checkpoint_id=str(out))

    def load(self, target: BenchState, step: int) -> None:
        dcp.load(target.flat, checkpoint_id=str(self.path(step)))  # in place


class DcpAsync(DcpSave):
    """``dcp.async_save`` with its default stager: a fresh CPU copy made inside the call,
    then ``save`` in a thread. No process group is needed (single-process no_dist path)."""

    name = "dcp async_save"
    stall_waits_on = "the call (the default stager copies inside it; returns a Future)"

    def stager(self):
        return None

    def save(self, state: BenchState, step: int) -> Timing:
        out = self.path(step)
        start = time.perf_counter()
        result = dcp.async_save(state.flat, checkpoint_id=str(out),
                                async_stager=self.stager())
        returned = time.perf_counter() - start
        upload = result
        if hasattr(result, "staging_completion"):  # AsyncSaveResponse (async staging)
            result.staging_completion.result()
            upload = result.upload_completion
        staged = time.perf_counter() - start
        upload.result()
        durable = time.perf_counter() - start
        return Timing(staged, durable, dir_bytes(out), {"call_s": returned})


class DcpAsyncStager(DcpAsync):
    """``dcp.async_save`` with one reused ``DefaultStager``: staging runs in a background
    thread into cached host buffers (pinned, with non-blocking copies, only with CUDA)."""

    name = "dcp async+stager"
    stall_waits_on = "the call + AsyncSaveResponse.staging_completion"
    reuses_buffers = True

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        cuda = torch.cuda.is_available()
        self.pinned = cuda
        self._stager = DefaultStager(StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
            use_non_blocking_copy=cuda))

    def stager(self):
        return self._stager

    def close(self) -> None:
        self._stager.close()


class Trainguard(Method):
    """``CheckpointManager.save`` (asynchronous) + ``wait``; ``restore`` (verified)."""

    name = "trainguard"
    blocking = False
    stall_waits_on = "max(h.stall_seconds, wall time of save()); durable = h.seconds_to_durable"
    reuses_buffers = True

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.mgr = CheckpointManager(str(work))  # one run dir: steps accumulate

    def save(self, state: BenchState, step: int) -> Timing:
        start = time.perf_counter()
        handle = self.mgr.save(step, state.tree, blocking=self.blocking)
        call = time.perf_counter() - start
        info = handle.wait()
        wall = time.perf_counter() - start
        detail = {"call_s": call, "stall_seconds": handle.stall_seconds,
                  "seconds_to_durable": handle.seconds_to_durable, "wall_to_wait_s": wall,
                  "arena_bytes": self.mgr.writer.arena.capacity,
                  "arena_pinned": self.mgr.writer.arena.pinned}
        if self.blocking:
            return Timing(call, call, info.manifest.total_bytes, detail)
        return Timing(max(call, handle.stall_seconds), handle.seconds_to_durable,
                      info.manifest.total_bytes, detail)

    def load(self, target: BenchState, step: int) -> None:
        assert self.mgr.restore(target.tree, step=step) == step

    def discard(self, step: int) -> None:
        shutil.rmtree(self.work / step_dir(step), ignore_errors=True)  # the disk is finite

    def close(self) -> None:
        self.mgr.close()


class TrainguardBlocking(Trainguard):
    name = "trainguard blocking"
    blocking = True
    stall_waits_on = "the call (save(..., blocking=True) returns after the commit)"


ALL = [TorchSave, SafeTensors, DcpSave, DcpAsync, DcpAsyncStager, TrainguardBlocking,
       Trainguard]
if DefaultStager is None:
    ALL.remove(DcpAsyncStager)
METHODS = {cls.name: cls for cls in ALL}
