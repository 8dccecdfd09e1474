"""Epoch loops that resume mid-epoch: ``run.epochs()``, ``run.batches()``, ``run.carry()``.

::

    for epoch in run.epochs(1, args.epochs + 1):     # like range(1, args.epochs + 1)
        hidden = run.carried("hidden", model.init_hidden(bsz))
        for batch in run.batches(train_loader):      # one step per batch
            ...
            run.carry(hidden=hidden)                 # what the next step starts from
        val_loss = evaluate()                        # epoch-end work
        run.log(val_loss=val_loss)                   # lands in the epoch's checkpoint

What holds across kills (each one is tested):

* A resumed run enters the epoch it was in and ``run.batches()`` yields the batches
  after the last completed step (a tracked plain DataLoader skips by sampler indices; a
  ``ResumableLoader`` or torchdata ``StatefulDataLoader`` resumes itself; a range or
  list is sliced); a run resumed after an epoch's last batch yields none of them.
* The end of each epoch is a save point (reason ``epoch``, ``final`` for the last):
  the state after the epoch-end work is committed together with "this epoch is done",
  so that work (validation, ``args.lr /= 4``, a best-so-far value) counts exactly once
  in what a resumed run continues from. A periodic save due at an epoch's last batch
  is taken at the epoch's end instead (one checkpoint per step: it cannot be both).
  A kill during the epoch-end work resumes before it, and it runs again.
* RNG streams: the streams at the start of each epoch are part of the checkpoint. A
  run resumed mid-epoch gets them back when ``run.epochs()`` yields (so the epoch's
  preamble draws what it drew), then the streams of the last completed step right
  before the next batch is fetched. A run resumed at an epoch boundary gets the
  boundary's streams when ``run.epochs()`` yields.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from trainguard.checkpoint import RNGState
from trainguard.checkpoint.tree import is_stateful
from trainguard.run.committer import parameters_finite
from trainguard.run.config import EXIT_RESUME
from trainguard.run.guards import NonFiniteLoss, batch_length
from trainguard.run.loaders import is_plain_loader

log = logging.getLogger("trainguard.run")
_END = object()


class EpochPosition:
    """The Run's checkpointed place in an epoch loop.

    Attributes:
        epochs: epochs completed (their end work included).
        batch: batches of the current epoch consumed (handed to a step, or skipped).
        exhausted: the current epoch's data has ended (only its end work is left).
        rng: the RNG streams at the current epoch's start (None outside an epoch).
        carry: values carried from one step to the next (``run.carry``).
    """

    def __init__(self) -> None:
        self.epochs = 0
        self.batch = 0
        self.exhausted = False
        self.rng: dict | None = None
        self.carry: dict[str, Any] = {}

    @property
    def mid_epoch(self) -> bool:
        """Whether the current epoch has begun (a resume lands inside it)."""
        return self.batch > 0 or self.exhausted

    def next_epoch(self) -> None:
        """The current epoch is complete."""
        self.epochs, self.batch, self.exhausted = self.epochs + 1, 0, False
        self.rng, self.carry = None, {}

    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "batch": self.batch, "exhausted": self.exhausted,
                "rng": self.rng, "carry": dict(self.carry)}

    def load_state_dict(self, state: dict) -> None:
        self.epochs, self.batch = int(state["epochs"]), int(state["batch"])
        self.exhausted = bool(state["exhausted"])
        self.rng, self.carry = state.get("rng"), dict(state.get("carry") or {})


class _Source:
    """How one epoch of ``data`` is iterated from a position."""

    def __init__(self, data: Any, iterable: Any, positioned: bool) -> None:
        self.data = data
        self.iterable = iterable
        self.positioned = positioned  # it resumes itself; else the Run skips what was used
        try:
            self.length: int | None = len(iterable)
        except TypeError:
            self.length = None

    def start(self, consumed: int) -> Iterator[Any]:
        if self.positioned or consumed == 0:
            return iter(self.iterable)
        if isinstance(self.iterable, (range, list, tuple, torch.Tensor)):
            return iter(self.iterable[consumed:])  # a view: nothing before it is touched
        it = iter(self.iterable)
        for _ in range(consumed):  # no way to seek: read and drop
            next(it, None)
        return it


class Batches:
    """What ``run.batches(data)`` returns: iterating it runs one step per batch of the
    current epoch; ``len()`` and other attributes are ``data``'s, so it can stand in for
    the loader in code that reads ``len(loader)`` or ``loader.dataset``."""

    def __init__(self, run: Any, source: _Source) -> None:
        self._run = run
        self._source = source

    def __iter__(self) -> Iterator[Any]:
        return self._run._batch_loop(self._source)

    def __len__(self) -> int:
        return len(self._source.data)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not data's: also keeps copy/pickle from recursing
            raise AttributeError(name)
        return getattr(self._source.data, name)


class EpochLoop:
    """The epoch API of :class:`~trainguard.run.Run` (a mixin: it drives the Run's steps)."""

    def epochs(self, start: int, stop: int | None = None) -> Iterator[int]:
        """The epochs still to run, like ``range(start, stop)`` (or ``range(stop)``).

        A resumed run yields the epoch it was in (inside it, ``run.batches()`` continues
        after the last completed step) or, resumed at an epoch boundary, the next one.
        Each epoch's end (the loop body returning) is saved and committed; the last as
        ``final``.

        Raises:
            ValueError: bounds that are not ints.
            RuntimeError: nothing tracked yet, or an epoch loop already running.
        """
        if stop is None:
            start, stop = 0, start
        for name, value in (("start", start), ("stop", stop)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"run.epochs() takes ints like range(), got {name}={value!r}")
        s = self._open("epochs()")
        if self._state is None:
            raise RuntimeError("call run.track(model=..., optimizer=...) before run.epochs()")
        if self._epochs_active:
            raise RuntimeError("an epoch loop is already running; use one run.epochs() loop")
        return self._epoch_loop(s, start, stop)

    def _epoch_loop(self, s: Any, start: int, stop: int) -> Iterator[int]:
        position = self._epoch
        self._settle_left_step()  # a run.steps() loop before it was left with `break`
        self._epochs_active, self.total = True, None
        s.metrics.begin(self._cycle.done, None, self._counters.samples)
        s.commits.restart_timer()
        while start + position.epochs < stop:
            if self.preempted:
                self._stop_for_preemption(s)
                break
            epoch = start + position.epochs
            self._enter_epoch()
            self._epoch_range = (epoch, stop)
            yield epoch
            if self.exit_code == EXIT_RESUME:  # preempted (exit_on_preempt=False): the
                break  # preemption save is the last; this epoch is not complete
            self._leave_epoch(s, epoch, last=epoch + 1 >= stop)
        else:
            s.commits.wait()
        self._epochs_active = False

    def _enter_epoch(self) -> None:
        position = self._epoch
        self._batches_used = False
        if position.mid_epoch:
            if position.rng is not None:  # the preamble of the epoch draws what it drew
                RNGState().load_state_dict(position.rng)
            return
        self._apply_rng()  # resumed at this boundary: the streams it was saved with
        position.carry = {}
        position.rng = RNGState().state_dict() if self.config.capture_rng else None

    def _leave_epoch(self, s: Any, epoch: int, last: bool) -> None:
        self._settle_left_step()  # run.batches() was left with `break`
        done = self._cycle.done
        self._epoch.next_epoch()
        s.metrics.event("epoch", done, epoch=epoch)
        if done > s.commits.last_saved:
            if parameters_finite(self.state):
                self._save(done, "final" if last else "epoch", wait=last)
            else:
                log.error("not saving the end of epoch %d (step %d): the model's parameters "
                          "hold NaN/inf", epoch, done)
        else:
            # This step is saved already (an unsized epoch's last batch hit the cadence):
            # the epoch-end results are committed with the next save instead.
            log.debug("end of epoch %d: step %d is saved already", epoch, done)

    # -- batches -------------------------------------------------------------------------

    def batches(self, data: Any) -> Batches:
        """The batches of the current epoch, one step each; use inside ``run.epochs()``.

        Args:
            data: a tracked DataLoader (plain or torchdata's ``StatefulDataLoader``), a
                tracked ``ResumableLoader``, a DataLoader whose sampler is tracked, or
                any iterable of batches (a range of offsets, a list...) whose position
                the Run keeps itself.

        Raises:
            RuntimeError: outside ``run.epochs()``, or used twice in one epoch.
            ValueError: a loader with a position that was not tracked.
        """
        self._open("batches()")
        if not self._epochs_active:
            raise RuntimeError("run.batches() runs inside `for epoch in run.epochs(E):`; "
                               "a loop over steps is run.steps(total, data=...)")
        if self._batches_used:
            raise RuntimeError("run.batches() was already used in this epoch: one loop of "
                               "batches per epoch (its position is what a resume continues)")
        source = self._source_of(data)
        self._batches_used = True
        return Batches(self, source)

    def enumerate(self, data: Any) -> Iterator[tuple[int, Any]]:
        """``enumerate(run.batches(data))`` whose index is the batch's place in its
        epoch, also after a mid-epoch resume."""
        batches = self.batches(data)
        for batch in batches:
            yield self._epoch.batch - 1, batch

    def _source_of(self, data: Any) -> _Source:
        tracked = any(obj is data for obj in self.state.values())
        position = self._positions.get(id(data))
        if position is not None:
            return _Source(data, position, positioned=True)
        if is_stateful(data):
            if not tracked:
                raise ValueError("run.batches(data): data holds a position that must be "
                                 "checkpointed: track it too, run.track(..., data=loader)")
            return _Source(data, data, positioned=True)
        if isinstance(data, torch.utils.data.DataLoader):
            samplers = (data.sampler, data.batch_sampler)
            if any(is_stateful(s) and any(o is s for o in self.state.values())
                   for s in samplers):
                return _Source(data, data, positioned=True)  # its tracked sampler resumes
            if is_plain_loader(data):
                raise ValueError("run.batches(loader): track the DataLoader so its position "
                                 "is checkpointed: run.track(..., data=loader)")
        return _Source(data, data, positioned=False)

    def _batch_loop(self, source: _Source) -> Iterator[Any]:
        s = self._open("batches()")
        position, epochs, cycle = self._epoch, self._epoch.epochs, self._cycle
        if source.length is not None and self._epoch_range is not None:  # for the ETA
            first, stop = self._epoch_range
            s.metrics.total = cycle.done + source.length * (stop - first) - position.batch
        if position.exhausted or (source.length is not None
                                  and position.batch >= source.length):
            self._apply_rng()  # the end work starts from the streams of the last step
            return  # resumed after this epoch's last batch: only its end work is left
        it, ahead, skipped = None, _END, 0
        while True:
            if self.preempted:
                self._stop_for_preemption(s)
                return
            if it is None:
                # Before the streams are set: a resuming iterator's own draws (a worker
                # seed, a skipped batch read again) must not shift them.
                it = source.start(position.batch)
            self._apply_rng()  # before the fetch: augmentation draws the restored streams
            batch, ahead = (next(it, _END), _END) if ahead is _END else (ahead, _END)
            if batch is _END:
                position.exhausted = True
                return
            position.batch += 1
            if cycle.done + 1 in self._counters.skip_steps and skipped != cycle.done + 1:
                skipped = cycle.done + 1  # its batch blew up before a rollback: drop it once
                self._on_skip(skipped)
                continue
            step = self._begin(s, cycle.done + 1)
            for check in self._checks:
                check.update(batch)
            cycle.count_samples(_length_or_zero(batch))
            yield batch
            last = source.length is not None and position.batch >= source.length
            if last:  # end the epoch now (no fetch, no RNG draw) so the source rolls over
                ahead = next(it, _END)
                position.exhausted = ahead is _END
            self._end(s, step, defer=last)
            if cycle.done < step:  # rolled back: continue from the restored position
                self._check_same_epoch(step, epochs)
                it, ahead = None, _END
                if position.exhausted:
                    return

    def _check_same_epoch(self, step: int, epochs: int) -> None:
        if self._epoch.epochs != epochs:
            raise NonFiniteLoss(
                f"a non-finite value at step {step} rolled the run back to step "
                f"{self._cycle.done}, in an earlier epoch, whose end work cannot be redone from "
                f"inside this one; lower the learning rate or clip gradients")

    # -- values carried between steps ----------------------------------------------------

    def carry(self, **values: Any) -> None:
        """Record values the next step starts from (an RNN's hidden state); they are
        saved with the step's checkpoint. Inside ``run.epochs()`` they belong to the
        epoch: a new epoch starts without them.

        Raises:
            RuntimeError: nothing tracked yet.
        """
        self._open("carry()")
        if self._state is None:
            raise RuntimeError("call run.track(...) before run.carry()")
        self._epoch.carry.update(values)

    def carried(self, name: str, default: Any = None) -> Any:
        """The value last given to ``run.carry(name=...)`` in this epoch (restored when
        the run resumed inside it), else ``default``."""
        return self._epoch.carry.get(name, default)


def _length_or_zero(batch: Any) -> int:
    try:
        return batch_length(batch)
    except (TypeError, ValueError):
        return 0

