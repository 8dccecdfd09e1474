"""Heartbeats: a small JSON file in the run directory that says the run is alive *and*
making progress, rewritten by a background thread.

Two clocks matter to whoever watches a run (the launcher's hang detection, a person):

* ``beat``: when the file was last written. The writer is a background thread, so a
  recent beat means the *process* is alive, even while the training loop is stuck.
* ``last_progress``: when the loop last completed a step or reported progress in a
  phase (``run.phase("validate")`` and its ``advance()``). A recent beat with an old
  ``last_progress`` is a hang: a deadlocked collective, a stuck data worker, a
  validation loop that never ends.

File format (``RUN/heartbeat.json``, replaced atomically, so a reader never sees half)::

    {"version": 1, "pid": 4242, "host": "node-3", "status": "running",
     "phase": "validate", "step": 1200, "total": 5000,
     "phase_started": 1718000000.0, "phase_done": 40, "phase_total": 100,
     "last_progress": 1718000012.5, "beat": 1718000020.1,
     "started": 1717990000.0, "interval": 10.0}

``status`` is ``running``, then ``finished``, ``preempted`` or ``failed`` at exit. Times
are Unix seconds (``time.time()``), comparable across processes on one host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from trainguard._units import human_duration

log = logging.getLogger("trainguard.run")

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_VERSION = 1
TRAIN = "train"


@dataclass(frozen=True)
class HeartbeatRecord:
    """One parsed ``heartbeat.json`` (see the module docstring for the fields)."""

    pid: int
    host: str
    status: str
    phase: str
    step: int
    total: int | None
    phase_started: float
    phase_done: int | None
    phase_total: int | None
    last_progress: float
    beat: float
    started: float
    interval: float
    version: int = HEARTBEAT_VERSION

    def seconds_since_progress(self, now: float | None = None) -> float:
        """How long the training loop has made no progress."""
        return (time.time() if now is None else now) - self.last_progress

    def seconds_since_beat(self, now: float | None = None) -> float:
        """How long since the file was written (large: the process is gone or frozen)."""
        return (time.time() if now is None else now) - self.beat

    def stalled(self, timeout: float, now: float | None = None) -> bool:
        """True when the run is running but made no progress for ``timeout`` seconds."""
        return self.status == "running" and self.seconds_since_progress(now) > timeout


def read_heartbeat(run_dir: str | os.PathLike) -> HeartbeatRecord | None:
    """Read ``RUN/heartbeat.json``; None when the run never wrote one.

    Raises:
        ValueError: the file exists but is not a heartbeat (names the file).
    """
    path = Path(run_dir) / HEARTBEAT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); was it written by trainguard?") \
            from exc
    names = {f.name for f in fields(HeartbeatRecord)}
    try:
        return HeartbeatRecord(**{k: v for k, v in doc.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"{path} lacks heartbeat fields ({exc})") from exc


class Heartbeat:
    """The live progress of a run, and the thread that writes it to disk.

    The training thread only updates fields in memory (cheap: a lock and a few
    assignments per step); the background thread writes the file every ``interval``
    seconds and logs a progress line every ``report_every`` seconds while a phase other
    than training runs, or a warning while no progress is made at all.

    Args:
        path: the heartbeat file.
        interval: seconds between writes.
        report_every: seconds between progress lines.
        wall_clock: Unix-time clock (injectable for tests).
    """

    def __init__(self, path: str | os.PathLike, *, interval: float, report_every: float,
                 wall_clock=time.time) -> None:
        self.path = Path(path)
        self._write_lock = threading.Lock()
        self.interval = interval
        self.report_every = report_every
        self._now = wall_clock
        self._lock = threading.Lock()
        now = self._now()
        self._fields = {"version": HEARTBEAT_VERSION, "pid": os.getpid(),
                        "host": socket.gethostname(), "status": "running", "phase": "start",
                        "step": 0, "total": None, "phase_started": now, "phase_done": None,
                        "phase_total": None, "last_progress": now, "beat": now,
                        "started": now, "interval": interval}
        self._last_report = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The last exception of a failed write (None after a good one).
        self.error: BaseException | None = None
        self._failures = 0

    # -- updates from the training thread ------------------------------------------------

    def progress(self, step: int | None = None, total: int | None = None) -> None:
        """Record progress (a completed step, or any sign of life from the loop)."""
        with self._lock:
            if step is not None:
                self._fields["step"] = step
            if total is not None:
                self._fields["total"] = total
            self._fields["last_progress"] = self._now()

    def set_phase(self, phase: str, total: int | None = None) -> str:
        """Enter ``phase``; returns the previous one. Entering a phase counts as progress."""
        with self._lock:
            previous = self._fields["phase"]
            now = self._now()
            self._fields.update(phase=phase, phase_started=now, phase_done=0 if total else None,
                                phase_total=total, last_progress=now)
            self._last_report = now
        return previous

    def advance(self, done: int) -> None:
        """Record progress inside the current phase (``done`` items so far)."""
        with self._lock:
            self._fields["phase_done"] = done
            self._fields["last_progress"] = self._now()

    def snapshot(self) -> dict:
        """A copy of the live fields."""
        with self._lock:
            return dict(self._fields)

    # -- writing -------------------------------------------------------------------------

    def beat(self) -> None:
        """Write the file now and log a progress line when one is due."""
        with self._lock:
            self._fields["beat"] = now = self._now()
            doc = dict(self._fields)
        # One fixed temp name: the run directory's writer lock makes this the only writer,
        # and a kill between write and rename leaves one stale file, not one per attempt.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with self._write_lock:  # the background writer and write_now() share the temp name
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)  # atomic: readers see the old or the new file
        if now - self._last_report >= self.report_every:
            self._last_report = now
            self._report(doc, now)

    def _report(self, doc: dict, now: float) -> None:
        idle = now - doc["last_progress"]
        stuck = idle >= self.report_every
        where = f"step {doc['step']}" + (f"/{doc['total']}" if doc["total"] else "")
        if doc["phase"] != TRAIN:
            done, total = doc["phase_done"], doc["phase_total"]
            count = ""
            if done is not None:
                count = f" {done}/{total}" if total else f" {done}"
                if total:
                    count += f" ({100 * done / total:.0f}%)"
            running = human_duration(now - doc["phase_started"])
            line = f"{doc['phase']}:{count} running {running} at {where}"
            if stuck:
                line += f", no progress for {human_duration(idle)}"
            (log.warning if stuck else log.info)("%s", line)
        elif stuck:
            log.warning("no progress for %s (phase %s at %s): is a step hung?",
                        human_duration(idle), doc["phase"], where)

    def start(self) -> None:
        """Write once, then start the background writer."""
        self._write_logged()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="trainguard-heartbeat",
                                        daemon=True)
        self._thread.start()

    def ensure_running(self) -> None:
        """Restart the writer thread if it died (it logs why when it does)."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            log.warning("heartbeat thread was not running; restarting it")
            self.start()

    def stop(self, status: str) -> None:
        """Stop the thread and write the final ``status`` (finished/preempted/failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval))
        with self._lock:
            self._fields["status"] = status
        self._write_logged()

    def write_now(self) -> bool:
        """Write the file at once (not at the next interval): e.g. when a resumed loop
        starts, so a launcher shows the resumed step without waiting ``interval``."""
        return self._write_logged()

    def _write_logged(self) -> bool:
        try:
            self.beat()
        except Exception as exc:  # a full or read-only disk must not stop training
            self.error = exc
            self._failures += 1
            if self._failures == 1 or self._failures % 100 == 0:
                log.warning("cannot write heartbeat %s (%s; %d failures); training goes "
                            "on, but a launcher watching it may think the run hung",
                            self.path, exc, self._failures)
            return False
        if self._failures:
            log.info("heartbeat writes to %s work again", self.path)
        self.error, self._failures = None, 0
        return True

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._write_logged()
        except BaseException as exc:  # pragma: no cover - last resort: never die silently
            self.error = exc
            log.exception("heartbeat thread died")


class Phase:
    """Handle of a ``run.phase(...)`` block; ``advance()`` reports progress in it.

    Attributes:
        name: the phase.
        total: items it has, if known.
        done: items reported done so far.
    """

    def __init__(self, heartbeat: Heartbeat, name: str, total: int | None) -> None:
        self.name = name
        self.total = total
        self.done = 0
        self._heartbeat = heartbeat

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done (batches, samples): refreshes the heartbeat."""
        self.done += n
        self._heartbeat.advance(self.done)
