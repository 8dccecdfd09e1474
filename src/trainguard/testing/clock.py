"""``FakeClock``: time that moves only when the test (or the code under test) says so.

Code that takes its clock and its sleep as arguments (``Supervisor``, ``Backoff``, ``Run``,
``Heartbeat``, ``watch``) is driven by one ``FakeClock`` through its bound methods::

    clock = FakeClock()
    backoff = Backoff(sleep=clock.sleep, clock=clock.monotonic)
    Supervisor(table, job_id, clock=clock.monotonic, wall_clock=clock.time,
               sleep=clock.sleep)

``sleep(s)`` returns at once, ``s`` later on the fake clock; ``monotonic()`` and
``time()`` move together, so a deadline on one and a timestamp on the other never
disagree. Nothing here waits for real, so a test using it takes as long on a slow machine
as on a fast one and its outcome never depends on either.
"""

from __future__ import annotations

import math
import threading

#: ``time()`` of a fresh ``FakeClock``: a fixed date (2024-01-01 00:00 UTC), so that
#: timestamps in a test's output are the same on every run.
DEFAULT_WALL_START = 1_704_067_200.0


class FakeClock:
    """A monotonic clock and a wall clock that advance only by :meth:`sleep`/:meth:`advance`.

    Thread-safe: every thread sees one shared time, and a ``sleep`` in any thread moves it
    for all of them (so two threads sleeping 1 s each move it 2 s: there is no scheduler).

    Args:
        start: what :meth:`monotonic` returns at first.
        wall_start: what :meth:`time` returns at first (Unix seconds).

    Attributes:
        sleeps: every duration passed to :meth:`sleep`, in order (what a retry loop waited).
    """

    def __init__(self, start: float = 0.0, wall_start: float = DEFAULT_WALL_START) -> None:
        self._lock = threading.Lock()
        self._elapsed = 0.0
        self._start, self._wall_start = float(start), float(wall_start)
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        """Seconds on the monotonic clock (a stand-in for :func:`time.monotonic`)."""
        with self._lock:
            return self._start + self._elapsed

    def time(self) -> float:
        """Unix seconds (a stand-in for :func:`time.time`); moves with :meth:`monotonic`."""
        with self._lock:
            return self._wall_start + self._elapsed

    def sleep(self, seconds: float) -> None:
        """Advance the clock by ``seconds`` and return at once (a stand-in for
        :func:`time.sleep`); the duration is recorded in :attr:`sleeps`.

        Raises:
            ValueError: ``seconds`` is negative or not finite (``time.sleep`` refuses both).
        """
        self._check(seconds)
        with self._lock:
            self.sleeps.append(float(seconds))
            self._elapsed += seconds

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (time passing outside any ``sleep``).

        Raises:
            ValueError: ``seconds`` is negative or not finite: a monotonic clock never goes
                back.
        """
        self._check(seconds)
        with self._lock:
            self._elapsed += seconds

    @staticmethod
    def _check(seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a fake clock moves forward by a finite number of seconds >= 0, "
                             f"got {seconds!r}")

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self.monotonic():.3f}, time={self.time():.3f})"
