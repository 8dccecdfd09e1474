"""The fuzz suite's harness: how many cases, a watch on every file a case touches, a
deadline per case, and a count of cases run (printed at the end by conftest.py).

``TRAINGUARD_FUZZ_EXAMPLES`` (default 40) is the number of generated cases per fuzz test;
``./scripts/test.sh`` runs the default, a longer hunt sets it higher::

    TRAINGUARD_FUZZ_EXAMPLES=2000 ./scripts/test.sh tests/fuzz -q
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("TRAINGUARD_FUZZ_EXAMPLES", "40"))
#: A case that runs this long is hung (a blocking open, a runaway parse): it fails. This is
#: a hang detector, not a speed check: every case takes milliseconds.
CASE_DEADLINE_S = 30.0

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

CASES: Counter = Counter()
FAILURES: Counter = Counter()

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.remove", "os.rename", "os.link", "os.symlink", "os.mkdir", "os.rmdir",
                 "os.truncate", "os.chmod"}


class _Watch:
    """Which files the running case may touch; every other access is recorded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run: str | None = None
        self.root: str | None = None
        self.violations: list[str] = []

    def check(self, event: str, args: tuple) -> None:
        if self.run is None or (event != "open" and event not in _WRITE_EVENTS):
            return
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        if event == "open":
            paths = paths[:1]
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if isinstance(args[1], str) else ""
            writes = bool(flags & _WRITE_FLAGS) or any(c in mode for c in "wax+")
        else:
            writes = True
        for raw in paths:
            path = os.path.abspath(os.fsdecode(raw))
            inside = path == self.run or path.startswith(self.run + os.sep)
            near = path.startswith(self.root + os.sep)  # the case's other files
            if not inside and (writes or near):
                with self.lock:
                    self.violations.append(f"{event} {'write' if writes else 'read'} {path}")


WATCH = _Watch()
sys.addaudithook(WATCH.check)  # cannot be removed: inert while no case runs


class CaseHung(Exception):
    """A fuzz case ran past :data:`CASE_DEADLINE_S`."""


@contextmanager
def guarded_case(name: str, root: Path, run: Path):
    """Run one case: count it, watch its file accesses, fail it if it hangs.

    Yields:
        The list that collects accesses outside ``run`` (must stay empty).
    """
    def hung(signum, frame):
        raise CaseHung(f"{name}: a case ran past {CASE_DEADLINE_S} s (hung)")

    CASES[name] += 1
    previous = signal.signal(signal.SIGALRM, hung)
    WATCH.root, WATCH.violations = str(root), []
    WATCH.run = str(run)
    signal.setitimer(signal.ITIMER_REAL, CASE_DEADLINE_S)
    try:
        yield WATCH.violations
    except BaseException:
        FAILURES[name] += 1
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        WATCH.run = None
