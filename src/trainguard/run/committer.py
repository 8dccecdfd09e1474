"""When a Run saves, and how: the cadence, and the saves for the end, errors and preemption.

Every save goes through :meth:`Committer.save`, at a step boundary, and returns only once
the checkpoint is committed. What each reason means (it is recorded in the manifest):

* ``periodic``: the step or time cadence came due;
* ``final``: the last step of ``run.steps(total)``; ``exit``: the loop was left early;
* ``requested``: ``run.request_save()``;
* ``preempted``: a preemption signal arrived;
* ``error``: an exception escaped the loop (never eligible as "best").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from trainguard.checkpoint import ManagerInterface, SaveHandle
from trainguard.errors import CheckpointError
from trainguard.run.config import RunConfig
from trainguard.run.heartbeat import Heartbeat
from trainguard.run.metrics import MetricsLogger

log = logging.getLogger("trainguard.run")


class Committer:
    """Owns the save cadence and performs the Run's saves.

    Periodic saves are asynchronous: ``save`` returns once the state is snapshotted to
    host memory and training goes on while the checkpoint is written; the commit is
    reported (a ``commit`` event) when the next step ends after it landed. Saves that
    end something (final, preempted, error) wait for their commit.

    Args:
        manager: the run's checkpoint manager.
        metrics: where ``commit`` events go (and which is fsync'd before each save).
        heartbeat: shows the ``save`` phase while a save blocks training.
        config: the cadence options (``save_every_steps``, ``save_every_seconds``).
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, manager: ManagerInterface, metrics: MetricsLogger, heartbeat: Heartbeat,
                 config: RunConfig, clock: Callable[[], float]) -> None:
        self.manager = manager
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._config = config
        self._clock = clock
        #: The newest step saved (snapshotted) or restored: nothing newer to save.
        self.last_saved = 0
        #: The newest step known to be committed (durable).
        self.last_committed = 0
        self._last_time = clock()
        self._pending: tuple[SaveHandle, str] | None = None
        self.requested = False

    def reset(self, step: int) -> None:
        """``step`` is committed as of now (after a restore)."""
        self.last_saved = self.last_committed = step
        self._last_time = self._clock()

    def restart_timer(self) -> None:
        """The time cadence counts from now (a loop starts)."""
        self._last_time = self._clock()

    def due(self, step: int, total: int | None) -> str | None:
        """The reason to save at the end of ``step``, or None."""
        cfg = self._config
        if step == total:
            return "final"
        if self.requested:
            return "requested"
        if cfg.save_every_steps is not None and step % cfg.save_every_steps == 0:
            return "periodic"
        if (cfg.save_every_seconds is not None
                and self._clock() - self._last_time >= cfg.save_every_seconds):
            return "periodic"
        return None

    def save(self, step: int, state: dict, reason: str, *, metrics: dict | None = None,
             tags: dict[str, str] | None = None, wait: bool = False) -> None:
        """Snapshot ``state`` as ``step`` and start writing it; ``wait`` for the commit.

        Raises:
            CheckpointError: a save that was waited for failed (or the manager refused).
        """
        finite = {k: v for k, v in (metrics or {}).items() if math.isfinite(v)}
        if self._pending is not None and (wait or self._pending[0].done()
                                          or self.manager.if_busy == "wait"):
            self.wait()  # the manager would wait for it anyway: report its commit first
        self._metrics.sync()  # metrics up to a committed step are as durable as the step
        previous = self._heartbeat.set_phase("save")
        try:
            handle = self.manager.save(step, state, metrics=finite, tags=tags, reason=reason,
                                       blocking=False)
        finally:
            self._heartbeat.set_phase(previous)
        self._last_time = self._clock()
        self.requested = False
        if handle.skipped:  # if_busy="skip" and the previous save is still being written
            return
        self.last_saved = step
        self._pending = (handle, reason)
        if wait:
            self.wait(raise_errors=True)

    def poll(self) -> None:
        """Report the in-flight save if it has finished (never blocks)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self, raise_errors: bool = False) -> None:
        """Block until the in-flight save finished and report it.

        A failed periodic save is logged and training goes on (the next save retries);
        with ``raise_errors`` the failure is raised instead.
        """
        if self._pending is None:
            return
        (handle, reason), self._pending = self._pending, None
        try:
            info = handle.wait()
        except CheckpointError as exc:
            self.last_saved = self.last_committed  # that step is not durable after all
            self._metrics.event("save_failed", handle.step, reason=reason, error=repr(exc))
            if raise_errors:
                raise
            log.error("save of step %d failed (%s); training goes on and the next save "
                      "retries; the newest commit is step %d", handle.step, exc.__cause__ or exc,
                      self.last_committed)
            return
        self.last_committed = max(self.last_committed, info.step)
        self._metrics.event("commit", info.step, reason=reason, bytes=info.total_bytes,
                            stall_seconds=round(handle.stall_seconds, 3),
                            seconds=round(handle.seconds_to_durable or 0.0, 3))

    def save_error(self, exc: BaseException, state: dict, done: int, at_step: int) -> None:
        """Commit ``state`` as ``reason="error"`` after ``exc``; never raises.

        The state is what the exception left, labelled with ``done``, the last completed
        step. When the exception came from inside a step's body the checkpoint is tagged
        ``resumable=false``: automatic resume skips it (the state may hold half a step).
        Nothing is saved when nothing happened since the last save, or when the model's
        parameters hold NaN/inf (resuming from them would be worse than nothing).
        """
        kind, what = type(exc).__name__, f"{type(exc).__name__}: {exc}"[:1000]
        try:
            self.wait()
        except Exception as wait_exc:  # pragma: no cover - wait() logs, does not raise
            log.error("in-flight save failed: %s", wait_exc)
        if done <= self.last_saved:
            log.info("%s at step %d; nothing new since the last save (step %d) to save",
                     kind, at_step, self.last_saved)
            return
        if not parameters_finite(state):
            log.error("%s at step %d; not saving an error checkpoint: the model's parameters "
                      "hold NaN/inf", kind, at_step)
            return
        tags = {"error": what}
        if at_step != done:
            # Raised inside step at_step's body: the state may hold part of that step (an
            # optimizer update, a data batch consumed). Kept for inspection; automatic
            # resume goes back to the newest consistent commit instead.
            tags["resumable"] = "false"
        try:
            self.save(done, state, "error", tags=tags, wait=True)
        except Exception as save_exc:
            log.error("could not save the error checkpoint (%s: %s); re-raising the original "
                      "error", type(save_exc).__name__, save_exc)
            return
        log.error("%s at step %d: committed step %d as reason=error (never 'best'); "
                  "re-raising", kind, at_step, done)
        self._metrics.event("error", done, error=what)


def parameters_finite(state: dict) -> bool:
    """Whether every floating parameter of the modules in ``state`` is finite.

    Buffers are not checked: some hold -inf on purpose (attention masks). One reduction
    and one host sync per device, so it is cheap next to the save it guards.
    """
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for obj in state.values():
        if isinstance(obj, torch.nn.Module):
            for tensor in obj.parameters():
                if tensor.is_floating_point() and tensor.numel():
                    flags.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    return all(bool(torch.stack(group).all()) for group in flags.values())
