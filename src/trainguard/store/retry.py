"""Riding out a short object-store outage: exponential backoff with jitter, in a budget.

obstore retries each request a few times by itself, within about a second: enough for a
dropped connection, not for an endpoint that is down for a minute (a gateway restart, a
regional blip, throttling). :class:`Backoff` wraps each store operation in a second loop
that waits longer: delays grow ``first_delay * multiplier**n`` up to ``max_delay``, each
drawn at random from the upper half of its band (so two writers that failed together do
not retry together), and it gives up once the next wait would pass ``budget`` seconds
since the first failure. The default budget is :data:`DEFAULT_BUDGET` (two minutes;
``TRAINGUARD_RETRY_BUDGET`` overrides it for an :class:`~trainguard.store.ObjectStore`).

Only transient errors are retried (:func:`is_transient`): 5xx answers, 408/429,
timeouts, connections that broke. A missing key, a refused permission, a failed
precondition or a bad request is an answer, raised at once.

``sleep`` and ``clock`` are injectable so tests never wait; nothing here compares clocks
of different machines.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from trainguard.errors import StoreError

log = logging.getLogger("trainguard.store")

T = TypeVar("T")

#: Seconds a store operation keeps retrying a transient error before it fails.
DEFAULT_BUDGET = 120.0

# obstore's exceptions that are answers, not outages (compared by name: obstore is optional)
_PERMANENT = {"NotFoundError", "AlreadyExistsError", "PreconditionError", "NotModifiedError",
              "PermissionDeniedError", "UnauthenticatedError", "InvalidPathError",
              "NotSupportedError", "NotImplementedError", "UnknownConfigurationKeyError"}
_STATUS = re.compile(r"status code: (\d{3})")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it wraps) is worth retrying after a wait.

    Transient: HTTP 5xx, 408 and 429 answers, timeouts, connection errors and obstore's
    generic errors without a status (a request that never got an answer). Everything
    else, including every Python error that is not an ``OSError``, is not.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        name = type(exc).__name__
        if name in _PERMANENT:
            return False
        if name == "GenericError":
            match = _STATUS.search(str(exc))
            status = int(match.group(1)) if match else None
            return status is None or status >= 500 or status in (408, 429)
        exc, seen = exc.__cause__, seen + 1  # a StoreError raised from obstore's error
    return False


@dataclass(frozen=True)
class Backoff:
    """How long and how often a store operation retries transient errors.

    Attributes:
        budget: seconds from the first failure after which the error is raised.
        first_delay: the first wait, in seconds.
        max_delay: no wait is longer.
        multiplier: each wait's band is this much higher than the last.
        sleep: called to wait (tests pass a fake).
        clock: a monotonic clock in seconds (tests pass a fake).
        seed: seeds the jitter (None: random).
    """

    budget: float = DEFAULT_BUDGET
    first_delay: float = 0.5
    max_delay: float = 20.0
    multiplier: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.budget >= 0 and self.first_delay > 0 and self.max_delay >= self.first_delay
                and self.multiplier >= 1):
            raise ValueError(f"retry budget and delays must be positive (budget >= 0, "
                             f"0 < first_delay <= max_delay, multiplier >= 1), got {self!r}")
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (0 = the first)."""
        ceiling = min(self.max_delay, self.first_delay * self.multiplier ** min(attempt, 64))
        return self._rng.uniform(ceiling / 2, ceiling)

    def call(self, operation: Callable[[], T], what: str,
             transient: Callable[[BaseException], bool] = is_transient) -> T:
        """Run ``operation``, retrying transient errors within the budget.

        Args:
            operation: the store request (anything that may be run again).
            what: what it does, for the final error ("cannot write s3://b/k").
            transient: which errors to retry.

        Returns:
            What ``operation`` returned.

        Raises:
            StoreError: still failing when the budget ran out (the last error chained).
            Exception: a non-transient error, as ``operation`` raised it.
        """
        started, attempt = self.clock(), 0
        while True:
            try:
                return operation()
            except Exception as exc:  # sorted by transient() below
                if not transient(exc):
                    raise
                wait = self.delay(attempt)
                elapsed = self.clock() - started
                attempt += 1
                if elapsed + wait > self.budget:
                    raise StoreError(
                        f"{what}: {_first_line(exc)} (still failing after {attempt} attempts "
                        f"in {elapsed:.0f} s, the retry budget of {self.budget:.0f} s; set "
                        f"TRAINGUARD_RETRY_BUDGET to wait longer)") from exc
                log.warning("%s: %s; retrying in %.1f s (attempt %d, %.0f s of the %.0f s "
                            "retry budget used)", what, _first_line(exc), wait, attempt,
                            elapsed, self.budget)
                self.sleep(wait)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else repr(exc)
    return line[:300]
