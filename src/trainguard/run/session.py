"""``Session``: what an open Run holds, opened together and closed together.

The checkpoint manager (with the run directory's writer lock), the metrics logger, the
heartbeat thread, the committer, the preemption signal handlers and the stderr log
handler. Opening takes them in that order and, if any step fails, closes what it had
already opened; closing never raises, because it runs while an exception may be on its
way out of the user's loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainguard.checkpoint import CheckpointManager
from trainguard.run.committer import Committer
from trainguard.run.config import RunConfig
from trainguard.run.distributed import open_manager, rank_log_dir
from trainguard.run.heartbeat import HEARTBEAT_FILE, Heartbeat
from trainguard.run.metrics import MetricsLogger, show_logs
from trainguard.run.signals import PreemptionHandler

log = logging.getLogger("trainguard.run")


class Session:
    """The resources of one open Run.

    Args:
        store: a run directory path, a Store, or a configured CheckpointManager.
        log_dir: where heartbeat.json and metrics.jsonl go (default: the store's root).
        config: the Run's options.
        clock: monotonic clock; wall_clock: Unix-time clock.
        describe: what the run is doing, for the preemption deadline message.

    Raises:
        ValueError: the store has no local directory and no ``log_dir`` was given.
        LockHeld: another process writes this run directory.
    """

    def __init__(self, store: str | os.PathLike | Any, log_dir: str | os.PathLike | None,
                 config: RunConfig, clock: Callable[[], float], wall_clock: Callable[[], float],
                 describe: Callable[[], str]) -> None:
        if isinstance(store, CheckpointManager) and config.keep is not None:
            raise ValueError("Run(manager, keep=...): give the retention policy to the "
                             "CheckpointManager itself, CheckpointManager(..., keep=...)")
        # Under torchrun: a manager that knows which rank saves what (run/distributed.py).
        self.manager = open_manager(store, keep=config.keep, mirror=config.mirror)
        self.metrics: MetricsLogger | None = None
        self.heartbeat: Heartbeat | None = None
        self.signals: PreemptionHandler | None = None
        self._undo_logging: Callable[[], None] | None = None
        try:
            root = log_dir if log_dir is not None else getattr(self.manager.store, "root", None)
            if root is None:
                raise ValueError(f"{self.manager.store.url} has no local directory for "
                                 f"heartbeat.json and metrics.jsonl; pass "
                                 f"Run(..., log_dir='a/local/dir')")
            self.dir = Path(rank_log_dir(root))  # ranks > 0 log beside rank 0, not over it
            # The manager takes the writer lock at its first save; taking it now makes a
            # second writer fail in seconds instead of after its first N steps.
            self.manager.acquire_writer()
            self.dir.mkdir(parents=True, exist_ok=True)
            self._undo_logging = show_logs()
            self.metrics = MetricsLogger(self.dir, clock=clock, wall_clock=wall_clock)
            self.heartbeat = Heartbeat(self.dir / HEARTBEAT_FILE,
                                       interval=config.heartbeat_seconds,
                                       report_every=config.progress_every_seconds,
                                       wall_clock=wall_clock)
            self.heartbeat.start()
            self.commits = Committer(self.manager, self.metrics, self.heartbeat, config, clock)
            self.signals = PreemptionHandler(config.preempt_signals, config.preempt_deadline,
                                             describe=describe, clock=clock)
            self.signals.install()
        except BaseException:
            self.close("failed", step=0, exit_code=1)
            raise

    def close(self, status: str, step: int, exit_code: int) -> None:
        """Close everything (final heartbeat ``status``, an ``end`` event); never raises."""
        def close_metrics() -> None:
            if self.metrics is not None:
                self.metrics.event("end", step, status=status, exit_code=exit_code)
                self.metrics.close()

        for what, undo in (
                ("signal handlers", lambda: self.signals and self.signals.uninstall()),
                ("heartbeat", lambda: self.heartbeat and self.heartbeat.stop(status)),
                ("metrics", close_metrics),
                ("checkpoint manager", self.manager.close),
                ("log handler", lambda: self._undo_logging and self._undo_logging())):
            try:
                undo()
            except Exception as exc:
                log.error("closing the run's %s failed: %s", what, exc)
        self._undo_logging = None
