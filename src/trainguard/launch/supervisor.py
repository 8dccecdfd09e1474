"""The local supervisor: runs a job's attempts until it succeeds, fails for good, or stops.

One attempt is one run of the script, in its own session (so a terminal's Ctrl-C or the
death of the launcher does not reach it), with its output in
``$TRAINGUARD_HOME/jobs/<id>/attempt-<n>.log``. While it runs, the supervisor watches:

* the per-attempt ``timeout``: SIGTERM (the script's ``Run`` saves and exits), SIGKILL
  after ``stop_grace``, then a retry;
* the heartbeat (``RUN/heartbeat.json``): no progress for ``hang_timeout`` -> the same;
* ``stop`` requests from the job table (``trainguard stop``) and SIGTERM/SIGINT to the
  supervisor itself: graceful stop, no restart (``--now``: SIGKILL at once);
* the budget: stop gracefully before the cost would exceed it.

The job's ``message`` always says what is happening now: ``attempt 2 running (retry
1/3)`` while it runs, ``attempt 1 exited with code 1 (RuntimeError: boom); retry 1/3 in
10 s`` while a retry waits, ``stopping on SIGINT (Ctrl-C): attempt 1 saves, ...`` during a
graceful stop, then the final word. An attempt killed by a signal keeps Popen's negative
exit code and is recorded as ``killed by SIGKILL``. A job that has ended shows no speed.

Exit codes: 0 -> succeeded. ``EXIT_RESUME`` (the script was preempted and committed) ->
restart at once without consuming a retry (bounded by ``max_resumes``). Anything else,
and timeouts and hangs -> a retry after the policy's delay, until retries run out.
Every attempt resumes from the newest valid checkpoint, because ``Run`` always does.
An attempt that fails before its first heartbeat with an import or syntax error is not
retried (``launch/failures.py``): the same code fails the same way again.

Under torchrun the attempt's exit code is the node's (``node_exit_code`` in
``launch/torchrun.py``): torchrun exits 1 whenever a worker exits non-zero, so each
worker records its own code in ``jobs/<id>/attempt-<n>.exits/`` and an attempt whose
every worker exited ``EXIT_RESUME`` counts as one exit code 75. A mixed outcome (some 75,
some failed or killed) is a failure; the attempt's reason and log name each worker's code.

Every timeout, hang, stop-grace, budget and retry-delay decision reads the supervisor's
``clock`` (monotonic), ``wall_clock`` (heartbeats carry Unix times) and ``sleep``, and an
attempt is started through ``start`` (:func:`start_process`): a test passes a
:class:`~trainguard.testing.FakeClock`'s methods and a scripted attempt, and the whole
retry loop runs in no real time.

Run detached as ``python -m trainguard.launch.supervisor JOB_ID``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from trainguard.launch.failures import error_line, retry_cannot_fix, signal_name
from trainguard.launch.jobs import JobTable
from trainguard.launch.logs import LogClock
from trainguard.launch.spec import format_duration
from trainguard.launch.torchrun import (
    ENV_EXITS,
    describe_workers,
    node_exit_code,
    torchrun_env,
    worker_codes,
)
from trainguard.run import EXIT_RESUME
from trainguard.run.heartbeat import read_heartbeat

log = logging.getLogger("trainguard.launch")

STOP_GRACEFUL, STOP_NOW = 1, 2


class AttemptProcess(Protocol):
    """A running attempt as the supervisor watches it: what :func:`start_process` returns."""

    pid: int

    def poll(self) -> int | None:
        """The exit code once it has ended (negative: killed by that signal), else None."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the attempt and every process it started."""
        ...


class _SessionProcess:
    """An attempt's process, the leader of its own session: a signal goes to its whole
    process group (torchrun's workers, a script's DataLoader workers)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen, self.pid = popen, popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        _signal_group(self.pid, sig)


def start_process(command: list[str], *, cwd: str, env: dict, log: BinaryIO) -> AttemptProcess:
    """Start one attempt: ``command`` in its own session (a terminal's Ctrl-C or the death
    of the launcher does not reach it), its stdout and stderr appended to ``log``."""
    return _SessionProcess(subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))


class Supervisor:
    """Runs and watches the attempts of one job.

    Args:
        table: the job table.
        job_id: the job (already created, status pending).
        poll: seconds between checks of the child, its heartbeat and the table.
        on_tick: called from the supervisor's loop (never from a signal handler) with the
            job's row, plus ``stop_signal`` (the signal that asked this supervisor to stop,
            or None): at each poll of a running attempt and of a retry's wait, after each
            new message, and once the job has ended. A foreground view streams the
            attempt's log and redraws its status line from it.
        clock: monotonic seconds: attempt timeouts, stop grace, retry delays, budgets.
        wall_clock: Unix seconds: the hang clock (heartbeats carry Unix times) and costs.
        sleep: waits between polls and before retries.
        start: starts an attempt (:func:`start_process`; a test passes a fake).

    Attributes:
        stop_signal: the first SIGINT/SIGTERM this supervisor received (None: none).
    """

    def __init__(self, table: JobTable, job_id: str, *, poll: float = 0.5,
                 on_tick: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 start: Callable[..., AttemptProcess] = start_process) -> None:
        self.table, self.job_id, self.poll = table, job_id, poll
        self.spec = table.get(job_id)["spec"]
        self.on_tick = on_tick
        self._clock, self._wall_clock, self._sleep, self._start = clock, wall_clock, sleep, start
        self._stop = 0
        self.stop_signal: int | None = None
        self._proc: AttemptProcess | None = None
        self._beat_seen = False  # the running (or last) attempt wrote a heartbeat
        self._cost_before = 0.0
        self._last_refresh = 0.0
        self._last_commit_check = 0.0
        self._speed_ref: tuple[float, int] | None = None

    # -- control ---------------------------------------------------------------------------

    def request_stop(self, now: bool = False, signum: int | None = None) -> None:
        """Stop after a graceful save (or at once with ``now``); never restart.

        Args:
            now: kill the attempt instead of letting it save.
            signum: the signal that asked (it names the stop in the job's message).
        """
        self._stop = max(self._stop, STOP_NOW if now else STOP_GRACEFUL)
        if signum is not None and self.stop_signal is None:
            self.stop_signal = signum

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # only flags: the loop reports and acts
            self.request_stop(now=self._stop >= STOP_GRACEFUL, signum=signum)  # 2nd: now
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        # The terminal of a foreground run closed: stop as on SIGTERM (the job commits and
        # can be resumed), unless the launch asked to outlive its terminal (`nohup`).
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, handler)

    def _poll_stop_request(self) -> None:
        requested = self.table.stop_requested(self.job_id)
        if requested:
            self.request_stop(now=requested >= STOP_NOW)

    # -- the job ---------------------------------------------------------------------------

    def run(self) -> str:
        """Run attempts until the job ends; returns its final status.

        An exception in the supervisor's own code ends the job ``failed`` with the error's
        message, after stopping the attempt it watched: never a job left ``lost``.
        """
        if threading_is_main():  # first: a Ctrl-C while torch loads stops the job cleanly
            self._install_signal_handlers()
        try:
            _load_checkpoint_layer()
            self.table.update(self.job_id, status="running", supervisor_pid=os.getpid())
            return self._run()
        except Exception as exc:
            log.error("the supervisor of job %s failed", self.job_id, exc_info=True)
            stopped = self._abandon_attempt()
            return self._finish("failed", f"the supervisor failed ({type(exc).__name__}: {exc})"
                                + ("; the attempt it watched was stopped" if stopped else ""))

    def _run(self) -> str:
        policy = self.spec.retry
        # `trainguard resume` reopens an ended job: its attempts go on from the last
        attempt = self.table.get(self.job_id)["attempt"] or 0
        failures = resumes = 0
        note = " (resumed)" if attempt else ""  # why this attempt runs: a retry, a resume
        while True:
            attempt += 1
            self._poll_stop_request()  # a `trainguard stop` sent while this one started
            if self._stop:
                return self._finish("stopped", f"{self._stopped_by()} before attempt {attempt}")
            code, reason, workers = self._attempt(attempt, note)
            self.table.end_attempt(self.job_id, attempt, code, _recorded(code, reason, workers))
            log.info("attempt %d ended: exit code %s (%s)", attempt, code,
                     _recorded(code, reason, workers))
            self.table.update(self.job_id, child_pid=None, speed=None)
            self._tick()  # a watcher shows the attempt's last output before what follows
            if self._stop or reason == "budget":
                why = "budget reached" if reason == "budget" else self._stopped_by()
                return self._finish("stopped", f"{why} after attempt {attempt}"
                                    + self._last_commit_note())
            if code == 0:
                return self._finish("succeeded", self._success(attempt))
            if code == EXIT_RESUME and reason == "exited":
                resumes += 1
                if resumes <= policy.max_resumes:
                    note = f" (resumed after preemption {resumes}/{policy.max_resumes})"
                    self._say(f"attempt {attempt} was preempted (exit code {EXIT_RESUME}: its "
                              f"state is committed); resuming at once")
                    continue
                return self._finish("failed", f"preempted {resumes} times (max_resumes)")
            error = error_line(self._log_path(attempt)) if code is not None else None
            if reason == "exited" and retry_cannot_fix(error, self._beat_seen):
                return self._finish("failed", f"attempt {attempt} failed before training "
                                    f"started: {error}; not retried (a retry cannot fix it)")
            failures += 1
            self.table.update(self.job_id, failures=failures)
            ended = _ended(code, reason, error, workers)
            if failures > policy.retries:
                return self._finish("failed", f"attempt {attempt} {ended}; {policy.retries} "
                                    f"{'retry' if policy.retries == 1 else 'retries'} used")
            delay = policy.delay_before_retry(failures)
            note = f" (retry {failures}/{policy.retries})"
            self._say(f"attempt {attempt} {ended}; retry {failures}/{policy.retries} in "
                      f"{delay:.0f} s", status="retrying")
            if not self._wait(delay):
                return self._finish("stopped", f"{self._stopped_by()} after attempt {attempt}"
                                    + self._last_commit_note())

    def _success(self, attempt: int) -> str:
        if self._beat_seen:
            return f"attempt {attempt} succeeded"
        # It never wrote a heartbeat in its run dir: whatever it did, nothing of it is
        # checkpointed where a resume (or `trainguard ls`) would look.
        return (f"attempt {attempt} exited 0 without opening a trainguard Run in "
                f"{self.spec.run_dir}: nothing was checkpointed")

    def _cause(self) -> str | None:
        """What asked for the stop, when it was a signal: ``SIGINT (Ctrl-C)``."""
        if self.stop_signal is None:
            return None
        name = signal.Signals(self.stop_signal).name
        return name + {signal.SIGINT: " (Ctrl-C)", signal.SIGHUP: " (its terminal closed)"
                       }.get(self.stop_signal, "")

    def _stopped_by(self) -> str:
        return f"stopped by {self._cause()}" if self._cause() else "stopped on request"

    def _last_commit_note(self) -> str:
        step = self.table.get(self.job_id).get("last_commit_step")
        return f"; last committed step {step}" if step is not None else ""

    def _say(self, message: str, **fields) -> None:
        """Record the job's new ``message`` (and ``fields``): what ``status`` and a
        foreground watcher show."""
        self.table.update(self.job_id, message=message, **fields)
        log.info("%s", message)
        self._tick()

    def _tick(self) -> None:
        if self.on_tick is None:
            return
        try:
            self.on_tick({**self.table.get(self.job_id), "stop_signal": self.stop_signal})
        except Exception as exc:  # a broken view (a closed terminal) must not end the job
            log.warning("the job's watcher failed (%r); the job goes on unwatched", exc)
            self.on_tick = None

    def _finish(self, status: str, message: str) -> str:
        # No attempt runs any more: no speed (so no ETA), no child.
        self.table.update(self.job_id, status=status, message=message, child_pid=None,
                          speed=None)
        log.info("job %s %s: %s", self.job_id, status, message)
        self._tick()
        return status

    def _abandon_attempt(self) -> bool:
        """Stop the running attempt (graceful, then SIGKILL); whether one was running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return False
        proc.signal(signal.SIGTERM)
        deadline = self._clock() + self.spec.stop_grace
        while proc.poll() is None and self._clock() < deadline:
            self._sleep(min(self.poll, max(0.0, deadline - self._clock())))
        if proc.poll() is None:
            proc.signal(signal.SIGKILL)
            while proc.poll() is None:  # SIGKILL cannot be ignored: this ends at once
                self._sleep(min(self.poll, 0.05))
        return True

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless a stop comes first (then False)."""
        deadline = self._clock() + seconds
        while self._clock() < deadline:
            self._poll_stop_request()
            if self._stop:
                return False
            self._tick()
            self._sleep(min(self.poll, max(0.0, deadline - self._clock())))
        return True

    # -- one attempt -----------------------------------------------------------------------

    def _child_env(self, exit_dir: Path | None) -> dict:
        env = {**os.environ, **self.spec.env}
        env.update(TRAINGUARD_RUN_DIR=self.spec.run_dir, TRAINGUARD_JOB_ID=self.job_id,
                   PYTHONUNBUFFERED="1")
        if exit_dir is not None:  # a torchrun attempt
            env[ENV_EXITS] = str(exit_dir)
            env.update({**torchrun_env(self.spec.stop_grace), **self.spec.env})
        return env

    def _log_path(self, n: int) -> Path:
        return self.table.job_dir(self.job_id) / f"attempt-{n}.log"

    def _attempt(self, n: int, note: str = "") -> tuple[int | None, str, str]:
        """Run attempt ``n``: (exit code, reason, its torchrun workers' codes or "").

        ``note`` says why it runs (``" (retry 1/3)"``), for the job's message."""
        job_dir = self.table.job_dir(self.job_id)
        log_path = self._log_path(n)
        log_clock = LogClock(log_path, self._wall_clock)  # when each part was written (--since)
        self.table.start_attempt(self.job_id, n)
        self._beat_seen, self._speed_ref = False, None
        if not os.path.isfile(self.spec.script):
            with open(log_path, "a") as out:
                out.write(f"trainguard: {self.spec.script} no longer exists; not started\n")
            self.table.update(self.job_id, attempt=n)
            return None, "script missing", ""
        exit_dir = None
        if self.spec.torchrun is not None:
            exit_dir = job_dir / f"attempt-{n}.exits"
            exit_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = self._start(self.spec.command, cwd=self.spec.cwd,
                               env=self._child_env(exit_dir), log=out)
        self._proc = proc
        self._say(f"attempt {n} running{note}", status="running", attempt=n,
                  child_pid=proc.pid, speed=None)
        started, started_wall = self._clock(), self._wall_clock()
        reason, kill_at, killed = "exited", None, False
        while True:
            code = proc.poll()
            log_clock.tick()
            if code is not None:
                self._proc = None
                self._refresh(proc.pid, started_wall, force=True)
                self._cost_before += self._rate() * (self._clock() - started)
                if exit_dir is None:
                    return code, reason, ""
                code, workers = self._torchrun_outcome(code, exit_dir, log_path)
                return code, reason, workers
            elapsed = self._clock() - started
            self._poll_stop_request()
            progress = self._refresh(proc.pid, started_wall)
            if kill_at is None:
                why = self._why_stop(elapsed, progress)
                # Each message is said before the signal goes: what the attempt prints
                # in answer then shows after it.
                if why == "stopped-now":
                    self._say(f"stopping now on {self._cause() or 'request'}: attempt {n} "
                              f"killed (SIGKILL)")
                    proc.signal(signal.SIGKILL)
                    reason, kill_at, killed = "stopped", self._clock(), True
                elif why:
                    self._say(self._stopping_message(why, n))
                    proc.signal(signal.SIGTERM)  # Run saves, commits and exits
                    reason, kill_at = why, self._clock() + self.spec.stop_grace
            elif not killed and (self._stop >= STOP_NOW or self._clock() >= kill_at):
                self._say(f"attempt {n} killed (SIGKILL): "
                          + ("a second stop request" if self._stop >= STOP_NOW else
                             f"it had not exited {self.spec.stop_grace:.0f} s after SIGTERM"))
                proc.signal(signal.SIGKILL)  # the grace ran out, or a 2nd Ctrl-C
                killed = True
            self._tick()
            self._sleep(self.poll)

    def _stopping_message(self, why: str, n: int) -> str:
        grace = f"SIGKILL in {self.spec.stop_grace:.0f} s if it has not exited"
        if why == "stopped":
            cause = self._cause()
            again = (f"; a second {signal.Signals(self.stop_signal).name} kills it"
                     if cause else "")
            return (f"stopping on {cause or 'request'}: attempt {n} saves, commits and "
                    f"exits ({grace}{again})")
        if why == "timeout":
            what = f"ran past its timeout ({format_duration(self.spec.timeout)})"
        elif why == "hang":
            what = f"made no progress for {format_duration(self.spec.hang_timeout)}"
        else:
            what = f"would pass the budget (${self.spec.budget_usd:.2f})"
        return f"attempt {n} {what}: stopping it (it saves, commits and exits; {grace})"

    def _torchrun_outcome(self, code: int, exit_dir: Path, log_path: Path) -> tuple[int, str]:
        """The node's exit code from torchrun's and its workers' records, said in the log."""
        nproc = self.spec.torchrun["nproc_per_node"]
        workers = worker_codes(exit_dir)
        node_code = node_exit_code(code, workers, nproc)
        described = describe_workers(workers, nproc)
        verdict = f"the attempt's exit code: {node_code}"
        if node_code == EXIT_RESUME:
            verdict += " (every worker saved and asked to be resumed)"
        with open(log_path, "a") as out:
            out.write(f"trainguard: torchrun exited with code {code}; {described}; {verdict}\n")
        return node_code, described

    def _why_stop(self, elapsed: float, last_progress: float) -> str | None:
        if self._stop >= STOP_NOW:
            return "stopped-now"
        if self._stop:
            return "stopped"
        if self.spec.timeout is not None and elapsed > self.spec.timeout:
            return "timeout"
        if (self.spec.hang_timeout is not None
                and self._wall_clock() - last_progress > self.spec.hang_timeout):
            return "hang"
        if self.spec.budget_usd is not None:
            # what it will have cost once stopped: the grace, plus two polls of slack
            later = elapsed + self.spec.stop_grace + 2 * self.poll
            projected = self._cost_before + self._rate() * later
            if projected >= self.spec.budget_usd:
                return "budget"
        return None

    def _rate(self) -> float:
        return (self.spec.gpu_hourly_usd or 0.0) / 3600.0

    def _refresh(self, pid: int, started_wall: float, force: bool = False) -> float:
        """Update the table from the heartbeat and checkpoints; returns the time of the
        attempt's last progress (its start until its own heartbeat says otherwise)."""
        now = self._wall_clock()
        try:
            beat = read_heartbeat(self.spec.run_dir)
        except (ValueError, OSError) as exc:  # half a file, a run dir turned into a file
            log.debug("cannot read the heartbeat in %s: %s", self.spec.run_dir, exc)
            beat = None
        # This attempt's heartbeat: written by a process started after the attempt began
        # (under torchrun the writer is rank 0, a grandchild, so its pid is not ``pid``).
        mine = beat is not None and beat.started >= started_wall - 1
        self._beat_seen = self._beat_seen or mine
        last_progress = max(started_wall, beat.last_progress) if mine else started_wall
        if not force and now - self._last_refresh < 1.0:
            return last_progress
        self._last_refresh = now
        fields = {"cost_usd": self._cost_before + self._rate() * (now - started_wall)}
        if mine:
            fields.update(step=beat.step, total=beat.total, last_heartbeat=beat.beat)
            if self._speed_ref is None or beat.step < self._speed_ref[1]:
                self._speed_ref = (now, beat.step)
            elif now - self._speed_ref[0] > 5:
                fields["speed"] = (beat.step - self._speed_ref[1]) / (now - self._speed_ref[0])
        if force or now - self._last_commit_check > 5:
            self._last_commit_check = now
            latest = _latest_commit(self.spec.run_dir)
            if latest is not None:
                fields.update(last_commit_step=latest.step, last_commit_at=latest.created_at)
        self.table.update(self.job_id, **fields)
        return last_progress


def _recorded(code: int | None, reason: str, workers: str) -> str:
    """The attempt's reason as recorded: ``exited``, ``killed by SIGKILL``,
    ``hang; killed by SIGKILL``, each with its torchrun workers' codes."""
    sig = signal_name(code)
    if sig:
        reason = f"killed by {sig}" if reason == "exited" else f"{reason}; killed by {sig}"
    return f"{reason}; {workers}" if workers else reason


_WHY = {"timeout": "ran past its timeout", "hang": "made no progress (hang)",
        "script missing": "could not start: its script no longer exists"}


def _ended(code: int | None, reason: str, error: str | None, workers: str) -> str:
    """How an attempt ended, for the job's message: ``exited with code 1 (RuntimeError:
    boom)``, ``was killed by SIGKILL``, ``made no progress (hang) and was killed by ...``."""
    parts = [_WHY[reason]] if reason in _WHY else []
    if code is not None:
        sig = signal_name(code)
        parts.append(f"was killed by {sig}" if sig else f"exited with code {code}")
    details = "; ".join(d for d in (error, workers) if d)
    return " and ".join(parts) + (f" ({details})" if details else "")


def _load_checkpoint_layer() -> None:
    """Import what reading commits needs (torch: seconds) before the first attempt starts.

    Imported at the first look for a commit instead, it would compete with the attempt's
    own start-up for the CPUs and stall the hang clock. Not at module level: the launcher
    side of ``trainguard run`` (``--detach``, ``--help``) imports this module and supervises
    nothing.
    """
    import trainguard.checkpoint.manager  # noqa: F401


def _latest_commit(run_dir: str):
    from trainguard.checkpoint import CheckpointManager

    try:
        return CheckpointManager(run_dir).latest_valid(resumable=True)  # what a resume uses
    except Exception as exc:  # a run dir being written; never fatal to the supervisor
        log.debug("cannot list checkpoints of %s: %r", run_dir, exc)
        return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the attempt leads its own session: its children go too
    except ProcessLookupError:
        pass


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a detached supervisor: ``python -m trainguard.launch.supervisor ID``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    table = JobTable()
    status = Supervisor(table, args[0]).run()
    return 0 if status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
