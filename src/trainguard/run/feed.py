"""``BatchFeed``: one batch per step for ``run.steps(total, data=...)``.

It re-iterates ``data`` at each epoch end, skips the batch of a step that rolled back
on a non-finite value, and runs the data checks before the loop sees a batch. The data
position itself is the tracked loader's (a ``ResumableLoader``, a plain ``DataLoader``
through its position...): a feed only decides when to call ``iter()`` and ``next()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class BatchFeed:
    """One batch per step from any iterable of batches, across epoch ends (what
    ``run.steps(total, data=...)`` uses).

    Args:
        data: an iterable of batches, re-iterated at each epoch end.
        checks: data checks (``update(batch)``, ``finish()``) run on each batch.
        skip: whether the batch of a step must be skipped (a non-finite rollback).
        on_skip: called with the step whose batch is skipped.
    """

    def __init__(self, data: Any, checks: list, skip: Any, on_skip: Any) -> None:
        self.data = data
        self._checks = checks
        self._skip = skip
        self._on_skip = on_skip
        self._iter: Iterator[Any] | None = None

    def reset(self) -> None:
        """Iterate afresh (after a restore moved the data position)."""
        self._iter = None

    def prime(self) -> None:
        """Create the iterator now, before the restored RNG streams are set: what it
        draws to resume (a DataLoader draws a worker seed at ``iter()``) is then
        overwritten, as an uninterrupted run made no such draw mid-epoch. A resumed
        position at an epoch's end yields nothing first, so the next epoch's iterator
        is made after the streams are set, where the uninterrupted run made it."""
        if self._iter is None:
            self._iter = iter(self.data)

    def next(self, step: int, total: int) -> Any:
        """The batch of ``step``; data checks run on it before the loop sees it."""
        batch = self._pull()
        if self._skip(step):
            self._on_skip(step)
            batch = self._pull()
        for check in self._checks:
            check.update(batch)
            if step == total:  # a run shorter than a check's window concludes at its end
                check.finish()
        return batch

    def _pull(self) -> Any:
        for _ in range(2):  # at most one epoch boundary between two batches
            if self._iter is None:
                self._iter = iter(self.data)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise ValueError("data= yielded no batch for a whole epoch: is the dataset empty?")
