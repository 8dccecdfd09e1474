"""``Run``: the one object a training script opens around its loop.

::

    with Run("runs/digits", save_every_steps=100, keep=keep_last(3)) as run:
        run.track(model=model, optimizer=opt, scheduler=sched, data=loader)
        for step, batch in run.steps(total_steps, data=loader):  # starts after the restored step
            loss = train_step(batch)
            run.log(loss=loss, lr=sched.get_last_lr()[0])

What it guarantees (each one is tested):

* Resume: ``track()`` restores the newest valid checkpoint, if any, into the objects.
* Cadence: a save is committed every N steps and/or T seconds and at the last step.
  Saves happen only at step boundaries, where the state is consistent.
* Preemption: a preemption signal finishes the current step, commits, and raises
  :class:`Preempted` (exit code :data:`EXIT_RESUME`).
* Errors: an exception commits the state as ``reason="error"`` (never "best") and is
  re-raised unchanged; memory is freed (gc, CUDA cache) on the way out.
* Exactness: with the RNG streams and the data position in the state (a tracked plain
  DataLoader, a :class:`ResumableLoader`...), a run killed at any instant and restarted
  ends bit-identical to one never interrupted. The RNG streams are set where the first
  resumed step starts, not in ``track()``.
* Epochs: ``run.epochs()`` / ``run.batches()`` resume mid-epoch; each epoch's end is a
  save point (see :mod:`trainguard.run.epochs`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainguard._units import human_duration
from trainguard.checkpoint import CheckpointInfo, CheckpointManager
from trainguard.checkpoint.tree import is_stateful
from trainguard.errors import CheckpointNotFound
from trainguard.run.best import BestCheckpoint
from trainguard.run.committer import parameters_finite
from trainguard.run.config import EXIT_RESUME, RunConfig
from trainguard.run.epochs import EpochLoop, EpochPosition
from trainguard.run.feed import BatchFeed
from trainguard.run.guards import (
    DataCheckFailed,
    MicroBatcher,
    NonFiniteLoss,
    batch_length,
    free_memory,
)
from trainguard.run.heartbeat import TRAIN, Phase
from trainguard.run.loaders import DataLoaderPosition
from trainguard.run.metrics import RESERVED, open_sinks, to_number
from trainguard.run.session import Session
from trainguard.run.signals import Preempted
from trainguard.run.state import RUN_KEY, RunCounters, build_state
from trainguard.run.step_cycle import StepCycle

log = logging.getLogger("trainguard.run")
RUN_DIR_ENV = "TRAINGUARD_RUN_DIR"


def _run_dir(store: Any) -> Any:
    """The store to use: the argument, else ``$TRAINGUARD_RUN_DIR`` (set by the launcher)."""
    from_env = os.environ.get(RUN_DIR_ENV)
    if store is None:
        if not from_env:
            raise ValueError("Run() needs a run directory: Run('runs/exp1'), or start the "
                             "script with `trainguard run`, which sets TRAINGUARD_RUN_DIR")
        return from_env
    if from_env and isinstance(store, (str, os.PathLike)) and "://" not in os.fspath(store) \
            and os.path.abspath(store) != os.path.abspath(from_env):
        log.warning("this script writes %s but its launcher watches %s (TRAINGUARD_RUN_DIR): "
                    "hang detection and progress need Run() or Run(os.environ[%r])",
                    store, from_env, RUN_DIR_ENV)
    return store


class Run(EpochLoop, BestCheckpoint):
    """Guards a training loop: resume, cadence, preemption, errors, heartbeats, logs.

    Args:
        store: the run directory (a path), a :class:`~trainguard.store.Store`, or a
            configured :class:`CheckpointManager` (incremental saves, a mirror...).
        log_dir: where heartbeat.json, metrics.jsonl and TensorBoard events go
            (default: the run directory; required for a store without a local root).
        clock: monotonic clock for cadence and rates (injectable for tests).
        wall_clock: Unix-time clock for heartbeats and metric timestamps.
        **options: the fields of :class:`RunConfig` (``save_every_steps``,
            ``save_every_seconds``, ``keep``, ``resume``, ``log_every_steps``, ...).

    Raises:
        TypeError, ValueError: an unknown or invalid option (naming it and the fix).
    """

    def __init__(self, store: str | os.PathLike | Any = None, *,
                 log_dir: str | os.PathLike | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, **options: Any) -> None:
        self.config = RunConfig.from_options(options)
        self._store_target = _run_dir(store)
        self._log_dir = log_dir
        self._clock, self._wall = clock, wall_clock
        self._s: Session | None = None
        self._used = False
        self._state: dict | None = None
        self._counters = RunCounters()
        self._micro = MicroBatcher(on_change=self._on_oom)
        self._checks: list = []
        self._feed: BatchFeed | None = None
        self._epoch = EpochPosition()
        self._epochs_active = False  # inside run.epochs()
        self._batches_used = False  # run.batches() ran in this epoch
        self._epoch_range: tuple[int, int] | None = None  # (current epoch, stop)
        self._positions: dict[int, DataLoaderPosition] = {}  # id(DataLoader) -> position
        #: The step this process resumed from (0 for a fresh start).
        self.start_step = 0
        #: The ``total`` of the current ``run.steps()`` loop.
        self.total: int | None = None
        #: 0, or EXIT_RESUME once a preemption save committed.
        self.exit_code = 0
        self._cycle = StepCycle()  # the step counter and what the running step recorded

    # -- properties ------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The step being run inside the loop body, else the last completed step."""
        return self._cycle.step

    @property
    def state(self) -> dict:
        """The checkpointed state: the tracked objects plus the Run's own entry."""
        if self._state is None:
            raise RuntimeError("nothing tracked yet: call run.track(...) first")
        return self._state

    @property
    def dir(self) -> Path:
        """Where heartbeat.json and metrics.jsonl are written."""
        return self._open("dir").dir

    @property
    def manager(self) -> CheckpointManager:
        """The run's :class:`CheckpointManager` (to list checkpoints, restore one...)."""
        return self._open("manager").manager

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal arrived (long phases may check it to stop early)."""
        return self._s is not None and self._s.signals is not None and self._s.signals.received

    @property
    def last_committed(self) -> int:
        """The newest step committed by this run (or restored: it is committed too)."""
        return self._s.commits.last_committed if self._s is not None else 0

    @property
    def micro_batch(self) -> int | None:
        """The micro-batch size ``accumulate`` uses (None: whole batches)."""
        return self._micro.micro_batch

    @property
    def rollbacks(self) -> int:
        """Non-finite-loss rollbacks so far in this run."""
        return self._counters.rollbacks

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Run:
        if self._used:
            raise RuntimeError("a Run can be entered once; create a new Run for a new loop")
        self._used = True
        if self.config.data_gate is not None:  # before the lock, the logs, any step
            self.config.data_gate.check(log=log.info)
        self._s = Session(self._store_target, self._log_dir, self.config, self._clock,
                          self._wall, describe=self._describe)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        status = "failed"
        try:
            status = self._on_exit(exc)
        finally:
            session, self._s = self._s, None
            if session is not None:
                session.close(status, self._cycle.done, self.exit_code)
            self._cycle.close()
            free_memory()  # drop what the loop left behind: CUDA cache, reference cycles
        return False  # never swallow: the original exception propagates with its traceback

    def _on_exit(self, exc: BaseException | None) -> str:
        s = self._open("__exit__")
        if isinstance(exc, Preempted):
            return "preempted"
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self._settle_left_step()
            s.commits.wait()
            done = self._cycle.done
            if self._state is not None and done > s.commits.last_saved:
                if parameters_finite(self.state):
                    ended = self.total is not None and done >= self.total
                    self._save(done, "final" if ended else "exit", wait=True)
                else:
                    log.error("not saving step %d at exit: the model's parameters hold "
                              "NaN/inf", done)
            s.signals.committed()
            return "preempted" if self.exit_code == EXIT_RESUME else "finished"
        if isinstance(exc, KeyboardInterrupt):
            log.warning("interrupted (KeyboardInterrupt): not saving a half-done step; the "
                        "newest commit is step %d", s.commits.last_committed)
        elif isinstance(exc, (NonFiniteLoss, DataCheckFailed)):
            log.error("%s: not saving (the state is not worth resuming from)",
                      type(exc).__name__)
        elif self._state is not None:
            s.commits.save_error(exc, self._state, self._cycle.done, self.step)
        return "failed"

    def _open(self, what: str) -> Session:
        if self._s is None:
            raise RuntimeError(f"run.{what} needs an open run: use `with Run(...) as run:`")
        return self._s

    # -- tracking and resume ---------------------------------------------------------------

    def track(self, **objects: Any) -> int:
        """Register what to checkpoint, then resume from the newest valid checkpoint.

        The RNG streams are not set here: they are set where the first resumed step
        starts (see :meth:`steps`, :meth:`epochs`), so nothing the script does before its
        loop can shift them.

        Args:
            **objects: named objects restored in place: modules, optimizers, schedulers,
                GradScalers, samplers/loaders (a plain ``DataLoader`` too), tensors, dicts
                or lists of plain values, and simple objects such as an
                ``argparse.Namespace`` (their attributes are set back).

        Returns:
            The step resumed from (0 for a fresh start).

        Raises:
            TypeError: an object that cannot be restored in place (e.g. a bare int).
            ValueError: ``resume=False`` but the run directory holds checkpoints.
            StateMismatch: a checkpoint that does not fit the objects.
        """
        s = self._open("track()")
        if self._state is not None:
            raise RuntimeError("run.track() was already called; call it once with every object")
        self._state = build_state(objects, {"run": self._counters, "epoch": self._epoch,
                                            "micro_batch": self._micro},
                                  self.config.capture_rng)
        self._positions = {id(obj.loader): obj for obj in self._state.values()
                           if isinstance(obj, DataLoaderPosition)}
        self._checks = [check.fresh() for check in self.config.data_checks]
        self._resume(s)
        s.metrics.sinks = open_sinks(s.dir, self.config.tensorboard, self.config.wandb,
                                     purge_step=self.start_step + 1)
        return self.start_step

    def _resume(self, s: Session) -> None:
        mgr, url = s.manager, s.manager.store.url
        s.heartbeat.set_phase("restore")
        step, source = 0, None
        if not self.config.resume:
            latest = mgr.latest_valid()
            if latest is not None:
                raise ValueError(
                    f"resume=False, but {url} already holds checkpoints (newest: step "
                    f"{latest.step}); a fresh run would collide with them. Use a new run "
                    f"directory, delete them (trainguard gc), or resume=True")
            log.info("fresh start in %s (resume=False)", url)
        else:
            try:
                step = mgr.restore(self.state)
            except CheckpointNotFound:
                if mgr.list():
                    log.warning("%s holds checkpoint directories but none is valid (see the "
                                "warnings above): fresh start", url)
                else:
                    log.info("no checkpoint in %s: fresh start", url)
            else:
                source = self._describe_checkpoint(mgr, step)
        self._counters.step = self.start_step = step
        self._cycle.start_at(step)
        s.commits.reset(step)
        s.heartbeat.progress(step)
        s.metrics.event("resume" if source else "start", step, source=source)

    def _describe_checkpoint(self, mgr: CheckpointManager, step: int) -> str:
        info: CheckpointInfo | None = next((i for i in mgr.list() if i.step == step), None)
        where = f"{mgr.store.url}/{info.key}" if info else mgr.store.url
        age = human_duration(self._wall() - info.created_at) if info else "?"
        log.info("resumed at step %d from %s (%s checkpoint, saved %s ago)", step, where,
                 info.reason if info else "?", age)
        return where

    # -- the loop --------------------------------------------------------------------------

    def steps(self, total: int, *, data: Any = None, batch_size: int | None = None) -> Iterator:
        """The steps still to run: ``restored + 1 .. total``.

        Args:
            total: the last step (steps count optimizer updates, from 1).
            data: an iterable of batches (ideally a tracked :class:`ResumableLoader`);
                the Run then fetches a batch per step, re-iterates it at each epoch end,
                skips batches after a non-finite rollback, runs the data checks, and
                yields ``(step, batch)`` pairs instead of steps.
            batch_size: samples per step, for samples/s (default: read from the batch).

        Raises:
            ValueError: a bad ``total``/``batch_size``, or a stateful ``data`` that was
                not tracked (its position would not be checkpointed).
        """
        s = self._open("steps()")
        if self._state is None:
            raise RuntimeError("call run.track(model=..., optimizer=...) before run.steps(): "
                               "the Run must know what to save and resume")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ValueError(f"total must be an int >= 0 (the last step), got {total!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        if self._epochs_active:
            raise RuntimeError("run.steps() inside run.epochs(): loop over run.batches(data) "
                               "in each epoch instead")
        if data is not None and is_stateful(data) and not any(
                obj is data for obj in self._state.values()):
            raise ValueError("data= holds a position that must be checkpointed: track it too, "
                             "run.track(..., data=loader)")
        if id(data) in self._positions:
            data = self._positions[id(data)]  # a tracked plain DataLoader: resumes by indices
        elif isinstance(data, torch.utils.data.DataLoader) and not is_stateful(data):
            log.warning("data= is a DataLoader that was not tracked: its position is not "
                        "checkpointed, so a resumed run restarts the epoch; track it, "
                        "run.track(..., data=loader)")
        self.total = total
        return self._loop(s, total, data, batch_size)

    def _loop(self, s: Session, total: int, data: Any, batch_size: int | None) -> Iterator:
        if self._cycle.in_step:  # a previous loop was left with `break`
            self._complete()
        self._feed = None if data is None else BatchFeed(
            data, self._checks, skip=lambda step: step in self._counters.skip_steps,
            on_skip=self._on_skip)
        cycle = self._cycle
        s.metrics.begin(cycle.done, total, self._counters.samples)
        s.commits.restart_timer()
        s.heartbeat.progress(cycle.done, total)
        s.heartbeat.write_now()  # launchers see the (resumed) step and the total at once
        if cycle.done >= total:
            log.info("step %d already reaches total %d: nothing to train", cycle.done, total)
        while True:
            if self.preempted:
                self._stop_for_preemption(s)
                return
            if cycle.done >= total:
                return
            if self._feed is not None and self._rng_pending():
                self._feed.prime()
            step = self._begin(s, cycle.done + 1)
            if self._feed is None:
                cycle.count_samples(batch_size or 0)
                yield step
            else:
                batch = self._feed.next(step, total)
                cycle.count_samples(batch_size or _length_or_zero(batch))
                yield step, batch
            self._end(s, step)

    def _rng_pending(self) -> bool:
        rng = self._state[RUN_KEY].get("rng") if self._state is not None else None
        return rng is not None and rng.pending

    def _apply_rng(self) -> None:
        """Set the restored RNG streams, once, where the first resumed step starts."""
        rng = self._state[RUN_KEY].get("rng") if self._state is not None else None
        if rng is not None:
            rng.apply()

    def _begin(self, s: Session, step: int) -> int:
        self._apply_rng()  # before the step's batch is fetched (steps(data=...) fetches next)
        self._cycle.begin(step)
        if s.heartbeat.snapshot()["phase"] != TRAIN:
            s.heartbeat.set_phase(TRAIN)
        return step

    def _complete(self) -> None:
        """Count the running step as done (its body finished)."""
        step = self._counters.step = self._cycle.complete()
        self._counters.samples += self._cycle.samples
        self._open("steps()").heartbeat.progress(step)

    def _settle_left_step(self) -> None:
        """A loop body left with ``break`` ended its step there: it counts as done,
        unless it logged a non-finite value (then nothing of it does)."""
        if self._cycle.in_step:
            if self._cycle.nonfinite is None:
                self._complete()
            else:
                self._cycle.abandon()

    def _end(self, s: Session, step: int, defer: bool = False) -> None:
        # After a preemption signal the loop's next turn saves, as "preempted". `defer`:
        # an epoch's last step, whose save is the epoch end's (one checkpoint per step).
        reason = None if self.preempted or defer else s.commits.due(step, self.total)
        if self._cycle.nonfinite is not None:
            self._rollback(s, step, f"{self.config.nonfinite_metric} is {self._cycle.nonfinite}")
            return
        if (reason is not None and self.config.nonfinite_metric is not None
                and not parameters_finite(self.state)):  # never commit a NaN model
            self._rollback(s, step, "the model's parameters hold NaN/inf")
            return
        self._complete()
        if self._cycle.claim_first_end():
            # After a first step the optimizer's moments exist: reserve the snapshot memory
            # for the whole state now, in the background, not inside the first save.
            if reason is None:
                s.manager.prepare(self.state)
        s.heartbeat.ensure_running()
        if (step % self.config.log_every_steps == 0 or step == self.total
                or self._cycle.phase_ran):
            s.metrics.line(step, self._counters.samples)
        s.commits.poll()
        if reason is not None:
            self._save(step, reason, wait=reason == "final")

    # -- saving ----------------------------------------------------------------------------

    def _save(self, step: int, reason: str, tags: dict[str, str] | None = None,
              wait: bool = False) -> None:
        # Only values logged during this very step describe its checkpoint (keep_best).
        metrics = self._cycle.values_for(step)
        self._open("save").commits.save(step, self.state, reason, metrics=metrics, tags=tags,
                                        wait=wait)

    def request_save(self) -> None:
        """Save and commit at the end of the current step, whatever the cadence."""
        self._open("request_save()").commits.requested = True

    def _stop_for_preemption(self, s: Session) -> None:
        signals, done = s.signals, self._cycle.done
        s.commits.wait()  # a save in flight: its commit counts (or, failed, is redone)
        if done > s.commits.last_saved:
            if parameters_finite(self.state):
                self._save(done, "preempted", tags={"signal": signals.signal_name}, wait=True)
            else:
                log.error("not saving step %d: the model's parameters hold NaN/inf", done)
        signals.committed()
        elapsed, step = signals.elapsed(), s.commits.last_committed
        late = elapsed > signals.deadline
        (log.error if late else log.warning)(
            "preempted by %s: step %d committed %.1f s after the signal (deadline %.0f s%s); "
            "exiting with code %d (EXIT_RESUME): run the same command to resume",
            signals.signal_name, step, elapsed, signals.deadline, ", MISSED" if late else "",
            EXIT_RESUME)
        s.metrics.event("preempted", step, signal=signals.signal_name, seconds=round(elapsed, 3))
        self.exit_code = EXIT_RESUME
        if self.config.exit_on_preempt:
            raise Preempted(step, signals.signal_name)

    # -- guards ----------------------------------------------------------------------------

    def _rollback(self, s: Session, step: int, what: str) -> None:
        cfg = self.config
        used = self._counters.rollbacks
        if used >= cfg.max_rollbacks:
            raise NonFiniteLoss(
                f"{what} at step {step} after {used} rollback(s) "
                f"(max_rollbacks={cfg.max_rollbacks}): the run cannot get past it. Lower the "
                f"learning rate, clip gradients, or check the data around step {step}")
        s.commits.wait()  # the newest checkpoint may still be in flight
        if s.manager.latest_valid() is None:
            raise NonFiniteLoss(
                f"{what} at step {step} and there is no checkpoint to roll back to "
                f"yet; save earlier (save_every_steps) or lower the learning rate")
        skip = sorted({*self._counters.skip_steps, step})
        previous = s.heartbeat.set_phase("rollback")
        restored = s.manager.restore(self.state)
        s.heartbeat.set_phase(previous)
        # The restore brought back that checkpoint's counters: re-apply what this rollback
        # learned, so the bound holds and the bad batch stays skipped.
        self._counters.skip_steps, self._counters.rollbacks = skip, used + 1
        self._counters.step = restored
        self._cycle.roll_back(restored)
        s.commits.reset(restored)
        if self._feed is not None:
            self._feed.reset()  # the data position was restored: iterate from there
        s.metrics.begin(restored, self.total, self._counters.samples)
        s.heartbeat.progress(restored)
        skips = self._feed is not None or self._epochs_active
        replay = ("its batch will be skipped" if skips else
                  "pass data= to run.steps() to skip its batch; the same batches are replayed")
        log.warning("%s at step %d: rolled back to step %d (rollback %d of %d); %s",
                    what, step, restored, used + 1, cfg.max_rollbacks, replay)
        s.metrics.event("rollback", step, to_step=restored, why=what, rollbacks=used + 1)

    def _on_skip(self, step: int) -> None:
        log.warning("skipping the batch of step %d (its %s was non-finite before a rollback)",
                    step, self.config.nonfinite_metric)
        self._open("steps()").metrics.event("skip", step)

    def check_data(self, batch: Any) -> None:
        """Run the data checks on a batch (done for you with ``steps(data=...)``).

        Raises:
            DataCheckFailed: a check failed.
        """
        self._open("check_data()")
        for check in self._checks:
            check.update(batch)

    def accumulate(self, batch: Any, fn: Callable[[Any], torch.Tensor], *,
                   backward: Callable[[torch.Tensor], None] | None = None,
                   zero_grad: Callable[[], None] | None = None) -> torch.Tensor:
        """Forward+backward over ``batch`` in micro-batches that halve on out-of-memory
        (opt-in; see :class:`MicroBatcher`). The effective batch, and so the update, stays
        the same; the micro-batch size is checkpointed.

        Args:
            batch: a tensor or tuples/lists/dicts of tensors, one row per sample.
            fn: forward of one micro-batch; returns its mean loss (one-element tensor).
            backward: backpropagates a loss (default ``loss.backward()``; with AMP
                ``lambda loss: scaler.scale(loss).backward()``).
            zero_grad: clears gradients after an OOM (default: the tracked optimizers').

        Returns:
            The batch's mean loss, detached.
        """
        self._open("accumulate()")
        optimizers = [o for o in self.state.values() if isinstance(o, torch.optim.Optimizer)]
        return self._micro.run(batch, fn, backward=backward, zero_grad=zero_grad,
                               optimizers=optimizers)

    def _on_oom(self, old: int, new: int, batch: int) -> None:
        log.warning("out of memory with micro-batch %d: freed memory, retrying with %d "
                    "(%d micro-batches per batch of %d; the effective batch is unchanged)",
                    old, new, math.ceil(batch / new), batch)
        if self._s is not None:
            self._s.metrics.event("oom", self.step, micro_batch=new, batch=batch)

    # -- logging and phases ----------------------------------------------------------------

    def log(self, **values: Any) -> None:
        """Record metric values (numbers or one-element tensors) for the current step.

        Lines carry the mean of each value since the previous line; outside the loop a
        line is written at once. A non-finite ``nonfinite_metric`` value (``loss`` by
        default) makes the step roll back instead of completing.

        Raises:
            TypeError: a value that is not a number. ValueError: a reserved name.
        """
        s = self._open("log()")
        converted = {}
        for name, value in values.items():
            if name in RESERVED:
                raise ValueError(f"run.log({name}=...): {name!r} is a field of every metrics "
                                 f"line; log it under another name")
            converted[name] = to_number(name, value)
        metric = self.config.nonfinite_metric
        if metric in converted and not math.isfinite(converted[metric]):
            self._cycle.mark_nonfinite(converted[metric])
        s.metrics.add(converted)
        if self._cycle.in_step or self._epochs_active:  # epoch-end values: the epoch's save
            self._cycle.record(converted)
        if not self._cycle.in_step:
            s.metrics.line(self._cycle.done, self._counters.samples)

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Phase]:
        """Mark a long stretch (validation, evaluation, export) in the heartbeat.

        While it runs, the heartbeat shows the phase and a progress line is logged every
        ``progress_every_seconds``; call ``advance()`` on the handle to report progress.

        Args:
            name: the phase, e.g. ``"validate"``.
            total: how many items it has (for "40/100 (40%)" lines), if known.
        """
        heartbeat = self._open("phase()").heartbeat
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty string, got {name!r}")
        if total is not None and (not isinstance(total, int) or total < 0):
            raise ValueError(f"phase total must be an int >= 0 or None, got {total!r}")
        handle = Phase(heartbeat, name, total)
        previous = heartbeat.set_phase(name, total)
        self._cycle.note_phase()  # this step's metrics line is written (validation results)
        started = self._clock()
        try:
            yield handle
        finally:
            heartbeat.set_phase(previous)
            took = self._clock() - started
            if took >= self.config.progress_every_seconds:  # it had progress lines: close them
                log.info("%s: done in %s at step %d", name, human_duration(took), self.step)

    def _describe(self) -> str:
        phase = self._s.heartbeat.snapshot()["phase"] if self._s and self._s.heartbeat else "?"
        return f"phase {phase} at step {self.step}, newest commit step {self.last_committed}"

    def __repr__(self) -> str:
        return f"Run({self._store_target!r}, step={self.step}, total={self.total})"


def _length_or_zero(batch: Any) -> int:
    try:
        return batch_length(batch)
    except (TypeError, ValueError):
        return 0
