"""The best checkpoint of a run: ``run.best()`` and ``run.restore_best()``.

::

    best_val_loss = run.best("val_loss")          # the best so far of the run resumed
    for epoch in run.epochs(E):
        ...
        run.log(val_loss=val_loss)                # lands in the epoch's checkpoint
    run.restore_best("val_loss", "min")           # load the best epoch's weights

Both read the metrics recorded in the manifests (what ``keep_best`` reads), through
:func:`trainguard.checkpoint.catalog.best_of`: never an error checkpoint, never a NaN.
"""

from __future__ import annotations

import logging

import torch

from trainguard.checkpoint import CheckpointInfo
from trainguard.checkpoint.catalog import best_of
from trainguard.run.committer import parameters_finite
from trainguard.run.state import RUN_KEY

log = logging.getLogger("trainguard.run")


class BestCheckpoint:
    """The best-checkpoint methods of :class:`~trainguard.run.Run` (a mixin)."""

    def best(self, metric: str, mode: str = "min") -> float | None:
        """The best value of ``metric`` among this run's checkpoints (None: none has it).

        Read at the start of a script, it is the "best so far" of the run being resumed
        (``best_val_loss = run.best("val_loss")``): a value logged in the epoch-end work
        is in that epoch's checkpoint. With a retention policy, keep that checkpoint:
        ``keep=keep_last(3) | keep_best(1, "val_loss")``.

        Raises:
            ValueError: a bad ``mode``.
        """
        info = best_of(self._open("best()").manager.list(), metric, mode)
        return None if info is None else info.metrics[metric]

    def restore_best(self, metric: str, mode: str = "min", *,
                     objects: tuple[str, ...] | None = None) -> CheckpointInfo | None:
        """Load the tracked modules (or ``objects``, by name) from the checkpoint with the
        best ``metric``: what "load the best saved model" does at the end of a script.

        Only those objects change: the Run's counters, RNG streams, optimizers and data
        position stay, and anything not yet saved is committed first, so the run's own
        history is not mixed with the best weights.

        Args:
            metric: a value logged with ``run.log`` (e.g. ``"val_loss"``).
            mode: ``"min"`` or ``"max"``.
            objects: names given to ``run.track`` (default: every tracked ``nn.Module``).

        Returns:
            The checkpoint loaded, or None when no checkpoint has ``metric`` (a warning).

        Raises:
            ValueError: a bad ``mode``, or a name that was not tracked.
        """
        s = self._open("restore_best()")
        names = objects if objects is not None else tuple(
            name for name, obj in self.state.items() if isinstance(obj, torch.nn.Module))
        unknown = [name for name in names if name not in self.state or name == RUN_KEY]
        if unknown or not names:
            raise ValueError(f"restore_best(objects=...): {unknown or 'nothing'} to restore; "
                             f"tracked: {', '.join(n for n in self.state if n != RUN_KEY)}")
        s.commits.wait()
        done = self._cycle.done
        if done > s.commits.last_saved and parameters_finite(self.state):
            self._save(done, "exit", wait=True)
        info = best_of(s.manager.list(), metric, mode)
        if info is None:
            log.warning("restore_best: no checkpoint in %s has %r: the objects keep their "
                        "current state", s.manager.store.url, metric)
            return None
        s.manager.restore({name: self.state[name] for name in names}, step=info.step)
        log.info("restored %s from the best checkpoint by %s (%s): step %d, %s=%.6g",
                 ", ".join(names), metric, mode, info.step, metric, info.metrics[metric])
        return info
