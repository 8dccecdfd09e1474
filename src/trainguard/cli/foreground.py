"""The foreground of ``trainguard run``: the job's own output, live, under one status line.

``trainguard run train.py`` (without ``--detach``) supervises the job in this process and
shows it on stderr as it goes::

    trainguard: job 3f2a9c1e: attempt 1 running; log: ~/.trainguard/jobs/3f2a9c1e/attempt-1.log
    loss=0.93                       <- the script's stdout and stderr, line by line
    trainguard: job 3f2a9c1e: attempt 1 exited with code 1 (RuntimeError: boom); retry 1/3 in 10 s
    trainguard: job 3f2a9c1e: attempt 2 running (retry 1/3); log: ...
    job 3f2a9c1e attempt 2  step 120/1000  committed 115 (4s ago)  23.81 steps/s  eta 36s

The last line is the status line: only on a terminal, redrawn in place beneath the
output. Without a terminal there is no status line, only the output and trainguard's
lines. stdout gets one line, once, when the job has ended (``job 3f2a9c1e succeeded:
attempt 2 succeeded``), as ``--detach``'s stdout gets only the job id.

The output is followed from the attempt's log file by offset (as ``trainguard logs -f``
does): the attempt runs in its own session and writes only to its log, so a Ctrl-C in the
terminal reaches the supervisor alone, and the terminal shows the same bytes that
``trainguard logs`` shows, in the order they were written (stdout and stderr merged).
Every update comes from the supervisor's loop (its ``on_tick``), never from a signal
handler, so nothing here runs in the middle of another write.

Exit codes (the table in ``docs/launch.md``): succeeded 0; failed, or stopped by
``trainguard stop`` or the budget, 1; stopped by a signal to ``trainguard run`` itself
128 + the signal (Ctrl-C: 130, SIGTERM: 143), after the run saved and committed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import click

from trainguard._units import human_duration
from trainguard.launch import JobSpec, JobTable, launch
from trainguard.launch.jobs import FINAL

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
#: A job stopped by signal N sent to ``trainguard run``: 128 + N, as a shell reports it.
EXIT_SIGNAL_BASE = 128

_CLEAR = "\r\x1b[2K"  # carriage return, erase the whole line
_READ_LIMIT = 1 << 20  # bytes of output read per tick


def exit_code(status: str, stop_signal: int | None) -> int:
    """The exit code of a foreground run that ended with ``status``.

    Args:
        status: the job's final status.
        stop_signal: the signal that asked the supervisor to stop (None: none did).
    """
    if status == "succeeded":
        return EXIT_SUCCEEDED
    if status == "stopped" and stop_signal is not None:
        return EXIT_SIGNAL_BASE + stop_signal
    return EXIT_FAILED


def run_in_foreground(spec: JobSpec) -> None:
    """Run ``spec`` here until it ends, showing it; print its final line and exit.

    Raises:
        click.exceptions.Exit: always, with :func:`exit_code`'s code.
        RunDirError: the run dir cannot be made (nothing was launched).
    """
    table = JobTable()
    supervise_in_foreground(table, lambda view: launch(spec, detach=False, table=table,
                                                       on_tick=view))


def supervise_in_foreground(table: JobTable,
                            start: Callable[[ForegroundView], tuple[str, str]]) -> None:
    """Run ``start(view)`` (a job's supervisor here: ``(job id, final status)``), showing
    the job as it runs; print its final line and exit with :func:`exit_code`'s code."""
    view = ForegroundView(table)
    try:
        with logs_shown_by(view):
            job_id, status = start(view)
    except KeyboardInterrupt:  # before the supervisor handles SIGINT: nothing started
        view.close()
        for job in table.all():  # the job this process created or reopened, if any
            if job["supervisor_pid"] == os.getpid() and job["status"] == "pending":
                table.update(job["id"], status="stopped",
                             message="interrupted (Ctrl-C) before its first attempt")
        click.echo("trainguard: interrupted before the job started", err=True)
        raise click.exceptions.Exit(EXIT_SIGNAL_BASE + signal.SIGINT) from None
    view.close()
    job = table.get(job_id)
    try:
        click.echo(f"job {job_id} {status}: {job['message']}")
    except OSError:  # the terminal is gone (SIGHUP): the exit code still says it
        pass
    raise click.exceptions.Exit(exit_code(status, view.stop_signal))


class LogFollower:
    """The lines appended to a file since the last read (the file may not exist yet).

    Args:
        path: the file (an attempt's log).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def lines(self, final: bool = False) -> list[str]:
        """Complete lines written since the last call; with ``final`` (the writer has
        exited) everything, a last unterminated line included."""
        chunks = []
        while True:
            chunk = self._read()
            chunks.append(chunk)
            if not final or not chunk:
                break
        *complete, self._partial = (self._partial + b"".join(chunks)).split(b"\n")
        if final and self._partial:
            complete.append(self._partial)
            self._partial = b""
        return [line.decode(errors="replace").removesuffix("\r") for line in complete]

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(_READ_LIMIT)
        except FileNotFoundError:
            return b""
        self.offset += len(chunk)
        return chunk


class ForegroundView:
    """What a person sees of a job supervised in this process; the supervisor's
    ``on_tick``.

    Args:
        table: the job table (for the jobs' log directories).
        stream: where it all goes (default stderr).
        tty: draw the status line (default: whether ``stream`` is a terminal).
    """

    def __init__(self, table: JobTable, stream: TextIO | None = None,
                 tty: bool | None = None) -> None:
        self.table = table
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        #: The signal that stopped the supervisor, as its last tick said.
        self.stop_signal: int | None = None
        self._job: dict | None = None
        self._attempt = 0
        self._follower: LogFollower | None = None
        self._message: str | None = None
        self._status_drawn = False
        self._gone = False  # the terminal hung up: nothing more can be shown

    def __call__(self, job: dict) -> None:
        self._job = job
        self.stop_signal = job.get("stop_signal")
        attempt = job.get("attempt") or 0
        if attempt != self._attempt:  # a new attempt: the old one's rest, then its start
            self._show_output(final=True)
            self._attempt = attempt
            self._follower = LogFollower(self._log_path(job["id"], attempt))
            self._show_message(job)
        self._show_output(final=job.get("child_pid") is None)  # no child: all is written
        self._show_message(job)
        self._draw_status(job)
        self._write("", flush=True)

    def note(self, text: str) -> None:
        """Print one line of trainguard's own (above the status line)."""
        self._line(f"trainguard: {text}")
        if self._job is not None:
            self._draw_status(self._job)
        self._write("", flush=True)

    def close(self) -> None:
        """Show what is left of the output and take the status line away."""
        self._show_output(final=True)
        if self._status_drawn:
            self._write(_CLEAR)
            self._status_drawn = False
        self._write("", flush=True)

    def job_dir(self) -> Path | None:
        return self.table.job_dir(self._job["id"]) if self._job else None

    # -- drawing ---------------------------------------------------------------------------

    def _log_path(self, job_id: str, attempt: int) -> Path:
        return self.table.job_dir(job_id) / f"attempt-{attempt}.log"

    def _show_output(self, final: bool) -> None:
        if self._follower is not None:
            for line in self._follower.lines(final=final):
                self._line(line)

    def _show_message(self, job: dict) -> None:
        message = job.get("message")
        if message == self._message:
            return
        self._message = message
        if job["status"] in FINAL or not message:
            return  # the final word is the one line on stdout
        where = ""
        if job.get("child_pid") and message.startswith(f"attempt {self._attempt} running"):
            where = f"; log: {self._log_path(job['id'], self._attempt)}"
        self._line(f"trainguard: job {job['id']}: {message}{where}")

    def _write(self, text: str, flush: bool = False) -> None:
        """Write to the stream; a terminal that hung up (EIO) ends the showing, never the
        supervisor: the job stops on the SIGHUP and its logs keep every line."""
        if self._gone:
            return
        try:
            self.stream.write(text)
            if flush:
                self.stream.flush()
        except OSError:
            self._gone = True

    def _line(self, text: str) -> None:
        if self._status_drawn:
            self._write(_CLEAR)
            self._status_drawn = False
        self._write(text + "\n")

    def _draw_status(self, job: dict) -> None:
        if not self.tty or job["status"] in FINAL:
            return
        width = _columns(self.stream) - 1  # a wrapped status line could not be redrawn
        self._write(_CLEAR + status_line(job)[:width])
        self._status_drawn = True


def status_line(job: dict, now: float | None = None) -> str:
    """``job 3f2a9c1e attempt 2  step 120/1000  committed 115 (4s ago)  23.81 steps/s
    eta 36s``: what is known, nothing that is not (no speed, no ETA once nothing runs)."""
    now = time.time() if now is None else now
    parts = [f"job {job['id']} attempt {job.get('attempt') or '-'}"]
    if job["status"] == "retrying":
        parts.append("waiting to retry")
    elif (job.get("message") or "").startswith("stopping"):
        parts.append("stopping: saving and committing")
    step, total = job.get("step"), job.get("total")
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    else:
        parts.append("no heartbeat yet")
    if job.get("last_commit_step") is not None:
        age = human_duration(now - job["last_commit_at"]) if job.get("last_commit_at") else "?"
        parts.append(f"committed {job['last_commit_step']} ({age} ago)")
    speed = job.get("speed")
    if speed:
        parts.append(f"{speed:.2f} steps/s")
        if total and step is not None:
            parts.append(f"eta {human_duration((total - step) / speed)}")
    if job.get("cost_usd"):
        parts.append(f"${job['cost_usd']:.2f}")
    return "  ".join(parts)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size().columns


class _ViewHandler(logging.Handler):
    """trainguard's log records, shown as lines of the view (never glued to the status
    line). The supervisor's own INFO lines are left out: the view shows the same words
    from the job's messages, and the final one once, on stdout."""

    def __init__(self, view: ForegroundView) -> None:
        super().__init__()
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("trainguard.launch") and record.levelno < logging.WARNING:
            return
        try:
            text = record.getMessage()
            job_dir = self.view.job_dir()
            if record.exc_info and job_dir is not None:  # a bug of ours: keep the traceback
                trace = job_dir / "supervisor.log"
                with open(trace, "a") as out:
                    out.write(f"{text}\n{''.join(traceback.format_exception(*record.exc_info))}")
                text += f" (traceback in {trace})"
            self.view.note(text)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


@contextmanager
def logs_shown_by(view: ForegroundView):
    """While inside, trainguard's log records are lines of ``view``."""
    logger = logging.getLogger("trainguard")
    saved, propagate = logger.handlers[:], logger.propagate
    logger.handlers[:] = [_ViewHandler(view)]
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate = saved, propagate
