"""Preemption: turn SIGTERM/SIGINT into "finish the step, commit, exit with EXIT_RESUME".

Platforms warn before they kill: Modal sends SIGINT, Slurm and Kubernetes send SIGTERM,
each followed by SIGKILL after a grace period (about 30 s on Modal and Kubernetes by
default). Python's defaults turn both into an immediate exit (SIGTERM) or an exception
raised anywhere, even inside a save (SIGINT's ``KeyboardInterrupt``). The handler here
only records the signal; the training loop checks it at step boundaries, where the state
is consistent, saves, and exits with :data:`EXIT_RESUME`.

A second signal while the first is being handled means "stop now": the previous handlers
are put back and the signal is delivered again (so a second Ctrl-C raises
``KeyboardInterrupt`` as usual). A save cut short this way is never committed: the
checkpoint format's manifest-last commit makes a torn save invisible.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from trainguard.errors import Preempted as Preempted  # re-exported (it was defined here)

log = logging.getLogger("trainguard.run")


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionHandler:
    """Records the first preemption signal and watches the save deadline.

    Args:
        signals: the signals to handle.
        deadline: seconds from the signal by which :meth:`committed` should be called.
        describe: returns what the run is doing (for the deadline message).
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, signals: tuple[int, ...], deadline: float, *,
                 describe: Callable[[], str] = lambda: "", clock=time.monotonic) -> None:
        self.signals = tuple(signals)
        self.deadline = deadline
        self._describe = describe
        self._clock = clock
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._committed = False

    @property
    def received(self) -> bool:
        """Whether a preemption signal has arrived."""
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        """Name of the signal received (empty before one arrives)."""
        return _name(self.signum) if self.signum is not None else ""

    def install(self) -> bool:
        """Install the handlers; returns False (and logs) outside the main thread, where
        Python does not allow signal handlers."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("Run entered outside the main thread: preemption signals are not "
                        "handled (only the main thread may install signal handlers)")
            return False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Put the previous handlers back and stop the deadline watch (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)

    def trigger(self, signum: int) -> None:
        """Act as if ``signum`` had been received (the handler's logic, callable directly)."""
        self._handle(signum, None)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            log.warning("second signal (%s) while preempted: stopping now, without waiting "
                        "for the save", _name(signum))
            self.uninstall()
            signal.raise_signal(signum)  # the previous handler or default action runs
            return
        self.signum = signum
        self.received_at = self._clock()
        log.warning("received %s: finishing the current step, then saving and committing "
                    "(deadline %.0f s); a second %s stops at once", _name(signum),
                    self.deadline, _name(signum))
        self._timer = threading.Timer(self.deadline, self._deadline_passed)
        self._timer.name = "trainguard-preempt-deadline"
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left before the deadline (inf before any signal)."""
        if self.received_at is None:
            return float("inf")
        return self.deadline - (self._clock() - self.received_at)

    def elapsed(self) -> float:
        """Seconds since the signal (0 before any signal)."""
        return 0.0 if self.received_at is None else self._clock() - self.received_at

    def committed(self) -> None:
        """Mark the preemption save as committed: the deadline watch stands down."""
        self._committed = True
        if self._timer is not None:
            self._timer.cancel()

    def _deadline_passed(self) -> None:
        # Runs on the timer thread: it only logs, so it cannot fail in a way that matters,
        # and it must never raise into nothing silently.
        try:
            if not self._committed:
                log.error("preemption deadline passed: %.0f s after %s the state is not "
                          "committed yet (%s); progress since the last commit is lost if "
                          "the platform kills the process now", self.deadline,
                          self.signal_name, self._describe() or "busy")
        except Exception:  # pragma: no cover - logging itself failed
            log.exception("preemption deadline watch failed")
