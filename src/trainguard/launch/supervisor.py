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

Exit codes: 0 -> succeeded. ``EXIT_RESUME`` (the script was preempted and committed) ->
restart at once without consuming a retry (bounded by ``max_resumes``). Anything else,
and timeouts and hangs -> a retry after the policy's delay, until retries run out.
Every attempt resumes from the newest valid checkpoint, because ``Run`` always does.

Under torchrun the attempt's exit code is the node's (``node_exit_code`` in
``launch/torchrun.py``): torchrun exits 1 whenever a worker exits non-zero, so each
worker records its own code in ``jobs/<id>/attempt-<n>.exits/`` and an attempt whose
every worker exited ``EXIT_RESUME`` counts as one exit code 75. A mixed outcome (some 75,
some failed or killed) is a failure; the attempt's reason and log name each worker's code.

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

from trainguard.launch.jobs import JobTable
from trainguard.launch.logs import LogClock
from trainguard.launch.torchrun import (
    ENV_EXITS,
    torchrun_env,
    describe_workers,
    node_exit_code,
    worker_codes,
)
from trainguard.run import EXIT_RESUME
from trainguard.run.heartbeat import read_heartbeat

log = logging.getLogger("trainguard.launch")

STOP_GRACEFUL, STOP_NOW = 1, 2


class Supervisor:
    """Runs and watches the attempts of one job.

    Args:
        table: the job table.
        job_id: the job (already created, status pending).
        poll: seconds between checks of the child, its heartbeat and the table.
        on_tick: called with the job's row after each refresh (a live progress line).
    """

    def __init__(self, table: JobTable, job_id: str, *, poll: float = 0.5,
                 on_tick: Callable[[dict], None] | None = None) -> None:
        self.table, self.job_id, self.poll = table, job_id, poll
        self.spec = table.get(job_id)["spec"]
        self.on_tick = on_tick
        self._stop = 0
        self._cost_before = 0.0
        self._last_refresh = 0.0
        self._last_commit_check = 0.0
        self._speed_ref: tuple[float, int] | None = None

    # -- control ---------------------------------------------------------------------------

    def request_stop(self, now: bool = False) -> None:
        """Stop after a graceful save (or at once with ``now``); never restart."""
        self._stop = max(self._stop, STOP_NOW if now else STOP_GRACEFUL)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.request_stop(now=self._stop >= STOP_GRACEFUL)  # a second one: now
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _poll_stop_request(self) -> None:
        requested = self.table.stop_requested(self.job_id)
        if requested:
            self.request_stop(now=requested >= STOP_NOW)

    # -- the job ---------------------------------------------------------------------------

    def run(self) -> str:
        """Run attempts until the job ends; returns its final status."""
        _load_checkpoint_layer()
        if threading_is_main():
            self._install_signal_handlers()
        self.table.update(self.job_id, status="running", supervisor_pid=os.getpid())
        policy = self.spec.retry
        # `trainguard resume` reopens an ended job: its attempts go on from the last
        attempt = self.table.get(self.job_id)["attempt"] or 0
        failures = resumes = 0
        while True:
            attempt += 1
            code, reason, workers = self._attempt(attempt)
            recorded = f"{reason}; {workers}" if workers else reason
            self.table.end_attempt(self.job_id, attempt, code, recorded)
            log.info("attempt %d ended: exit code %s (%s)", attempt, code, recorded)
            ended = f"{reason} (exit code {code}{'; ' + workers if workers else ''})"
            if self._stop or reason == "budget":
                why = "budget reached" if reason == "budget" else "stopped on request"
                return self._finish("stopped", f"{why} after attempt {attempt}")
            if code == 0:
                return self._finish("succeeded", f"attempt {attempt} succeeded")
            if code == EXIT_RESUME and reason == "exited":
                resumes += 1
                if resumes <= policy.max_resumes:
                    self.table.update(self.job_id, message=f"preempted; resuming ({resumes})")
                    continue
                return self._finish("failed", f"preempted {resumes} times (max_resumes)")
            failures += 1
            self.table.update(self.job_id, failures=failures)
            if failures > policy.retries:
                return self._finish("failed", f"attempt {attempt} {ended}; "
                                    f"{policy.retries} retries used")
            delay = policy.delay_before_retry(failures)
            self.table.update(self.job_id, status="retrying",
                              message=f"attempt {attempt} {ended}; "
                                      f"retry {failures}/{policy.retries} in {delay:.0f} s")
            if not self._wait(delay):
                return self._finish("stopped", f"stopped on request after attempt {attempt}")

    def _finish(self, status: str, message: str) -> str:
        self.table.update(self.job_id, status=status, message=message, child_pid=None)
        log.info("job %s %s: %s", self.job_id, status, message)
        return status

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless a stop comes first (then False)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._poll_stop_request()
            if self._stop:
                return False
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))
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

    def _attempt(self, n: int) -> tuple[int | None, str, str]:
        """Run attempt ``n``: (exit code, reason, its torchrun workers' codes or "")."""
        job_dir = self.table.job_dir(self.job_id)
        log_path = job_dir / f"attempt-{n}.log"
        clock = LogClock(log_path)  # when each part of the log was written (logs --since)
        self.table.start_attempt(self.job_id, n)
        if not os.path.isfile(self.spec.script):
            with open(log_path, "a") as out:
                out.write(f"trainguard: {self.spec.script} no longer exists; not started\n")
            return None, "script missing", ""
        exit_dir = None
        if self.spec.torchrun is not None:
            exit_dir = job_dir / f"attempt-{n}.exits"
            exit_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(self.spec.command, cwd=self.spec.cwd,
                                    env=self._child_env(exit_dir), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.table.update(self.job_id, status="running", attempt=n, child_pid=proc.pid)
        started, started_wall = time.monotonic(), time.time()
        reason, kill_at = "exited", None
        while True:
            code = proc.poll()
            clock.tick()
            if code is not None:
                self._refresh(proc.pid, started_wall, force=True)
                self._cost_before += self._rate() * (time.monotonic() - started)
                if exit_dir is None:
                    return code, reason, ""
                code, workers = self._torchrun_outcome(code, exit_dir, log_path)
                return code, reason, workers
            elapsed = time.monotonic() - started
            self._poll_stop_request()
            progress = self._refresh(proc.pid, started_wall)
            if kill_at is None:
                why = self._why_stop(elapsed, progress)
                if why == "stopped-now":
                    _signal_group(proc.pid, signal.SIGKILL)
                    reason, kill_at = "stopped", time.monotonic()
                elif why:
                    _signal_group(proc.pid, signal.SIGTERM)  # Run saves, commits and exits
                    reason, kill_at = why, time.monotonic() + self.spec.stop_grace
                    log.info("attempt %d: %s; SIGTERM sent", n, why)
            elif time.monotonic() >= kill_at:
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(self.poll)

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
        if self.spec.hang_timeout is not None and time.time() - last_progress > self.spec.hang_timeout:
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
        now = time.time()
        try:
            beat = read_heartbeat(self.spec.run_dir)
        except ValueError:
            beat = None
        # This attempt's heartbeat: written by a process started after the attempt began
        # (under torchrun the writer is rank 0, a grandchild, so its pid is not ``pid``).
        mine = beat is not None and beat.started >= started_wall - 1
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
        if self.on_tick is not None:
            self.on_tick(self.table.get(self.job_id))
        return last_progress


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
        return CheckpointManager(run_dir).latest_valid()
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
