"""The supervisor's decisions on a fake clock: timeouts, stop grace, hangs, budgets and
retry delays, each asserted to the poll, with scripted attempts and no real waiting
(the real-process journeys are in ``tests/integration/test_launch.py``)."""

from __future__ import annotations

import json
import signal
import time

import pytest

import trainguard.launch.supervisor as supervisor_module
from trainguard.launch.jobs import JobTable
from trainguard.launch.spec import JobSpec, RetryPolicy
from trainguard.launch.supervisor import Supervisor
from trainguard.testing import FakeClock

POLL = 0.5


class ScriptedAttempt:
    """An attempt that behaves as told, on the fake clock.

    Args:
        code: its exit code when it ends by itself.
        exit_after: seconds after its start it ends by itself (None: never).
        on_sigterm: its exit code after SIGTERM (None: it ignores SIGTERM).
        term_seconds: how long it takes to save and exit after SIGTERM.
        progress_for: seconds it writes heartbeats with progress (None: no heartbeat).
    """

    pid = 999_999_999  # never signalled for real: signals come to signal() below

    def __init__(self, *, code: int = 0, exit_after: float | None = None,
                 on_sigterm: int | None = 75, term_seconds: float = 1.0,
                 progress_for: float | None = None) -> None:
        self.code, self.exit_after = code, exit_after
        self.on_sigterm, self.term_seconds = on_sigterm, term_seconds
        self.progress_for = progress_for
        self.signals: list[tuple[float, str]] = []  # (seconds after start, signal name)
        self.exit_at: float | None = None  # when it ends, in seconds after its start
        self.result: int | None = None

    def begin(self, clock: FakeClock, run_dir: str) -> None:
        self.clock, self.run_dir = clock, run_dir
        self.started, self.started_wall = clock.monotonic(), clock.time()
        if self.exit_after is not None:
            self.exit_at, self.result = self.exit_after, self.code

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.started

    def poll(self) -> int | None:
        if self.progress_for is not None:
            self._beat()
        if self.exit_at is not None and self.elapsed() >= self.exit_at:
            return self.result
        return None

    def signal(self, sig: int) -> None:
        now = self.elapsed()
        self.signals.append((now, signal.Signals(sig).name))
        if sig == signal.SIGKILL:
            self.exit_at, self.result = now, -signal.SIGKILL
        elif sig == signal.SIGTERM and self.on_sigterm is not None:
            if self.exit_at is None or now + self.term_seconds < self.exit_at:
                self.exit_at, self.result = now + self.term_seconds, self.on_sigterm

    def _beat(self) -> None:
        """The heartbeat a Run writes: progress until ``progress_for``, then none."""
        now = self.clock.time()
        progress = self.started_wall + min(self.elapsed(), self.progress_for)
        doc = {"version": 1, "pid": self.pid, "host": "here", "status": "running",
               "phase": "train", "step": int(progress - self.started_wall), "total": None,
               "phase_started": self.started_wall, "phase_done": None, "phase_total": None,
               "last_progress": progress, "beat": now, "started": self.started_wall,
               "interval": 1.0}
        with open(f"{self.run_dir}/heartbeat.json", "w") as out:
            json.dump(doc, out)


class Job:
    """One job on a fake clock: its table, its scripted attempts, the messages it said."""

    def __init__(self, tmp_path, attempts: list[ScriptedAttempt], **spec) -> None:
        script = tmp_path / "train.py"
        script.write_text("")
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        self.table = JobTable(tmp_path / "home")
        self.id = self.table.create(JobSpec(script=str(script), run_dir=str(run_dir), **spec))
        self.clock = FakeClock()
        self.scripted, self.started = list(attempts), []
        self.messages: list[str] = []
        self.on_tick = None  # a test's hook, called with each row

    def start(self, command, *, cwd, env, log):
        attempt = self.scripted.pop(0)
        attempt.begin(self.clock, env["TRAINGUARD_RUN_DIR"])
        self.started.append(attempt)
        return attempt

    def _tick(self, row: dict) -> None:
        if not self.messages or self.messages[-1] != row["message"]:
            self.messages.append(row["message"])
        if self.on_tick is not None:
            self.on_tick(row)

    def run(self) -> str:
        return Supervisor(self.table, self.id, poll=POLL, on_tick=self._tick,
                          clock=self.clock.monotonic, wall_clock=self.clock.time,
                          sleep=self.clock.sleep, start=self.start).run()

    def row(self) -> dict:
        return self.table.get(self.id)

    def reasons(self) -> list[str]:
        return [a.reason for a in self.table.attempts(self.id)]

    def gaps(self) -> list[float]:
        """Seconds from each attempt's end to the next one's start, on the fake clock."""
        return [b.started - (a.started + a.exit_at)
                for a, b in zip(self.started, self.started[1:], strict=False)]


@pytest.fixture(autouse=True)
def never_really_wait(monkeypatch):
    """The supervisor must wait on the clock it was given: a real sleep fails the test.
    (It also must not install its signal handlers in the test process.)"""
    def real_sleep(seconds):
        raise AssertionError(f"the supervisor slept {seconds} s for real")

    monkeypatch.setattr(time, "sleep", real_sleep)
    monkeypatch.setattr(supervisor_module, "threading_is_main", lambda: False)


def test_a_timeout_stops_the_attempt_gracefully_and_retries_after_the_delay(tmp_path):
    first = ScriptedAttempt(on_sigterm=75, term_seconds=3)  # runs forever, saves on SIGTERM
    job = Job(tmp_path, [first, ScriptedAttempt(exit_after=5)], timeout=30, stop_grace=10,
              retry=RetryPolicy(retries=2, delay=7))
    assert job.run() == "succeeded"
    [(when, name)] = first.signals
    assert name == "SIGTERM" and 30 < when <= 30 + POLL
    assert first.exit_at == when + 3  # it saved and exited on its own: no SIGKILL
    assert job.reasons() == ["timeout", "exited"]  # its exit 75 is not a preemption
    assert 7 <= job.gaps()[0] <= 7 + POLL
    assert any("ran past its timeout (30s)" in m and "SIGKILL in 10 s" in m
               for m in job.messages), job.messages
    assert "retry 1/2 in 7 s" in "\n".join(job.messages)
    assert job.row()["failures"] == 1


def test_an_attempt_that_ignores_sigterm_is_killed_when_the_stop_grace_runs_out(tmp_path):
    stuck = ScriptedAttempt(on_sigterm=None)
    job = Job(tmp_path, [stuck], timeout=20, stop_grace=12, retry=RetryPolicy(retries=0))
    assert job.run() == "failed"
    (term_at, term), (kill_at, kill) = stuck.signals
    assert (term, kill) == ("SIGTERM", "SIGKILL")
    assert 12 <= kill_at - term_at <= 12 + POLL
    assert job.reasons() == ["timeout; killed by SIGKILL"]
    assert "it had not exited 12 s after SIGTERM" in "\n".join(job.messages)
    assert job.row()["message"] == ("attempt 1 ran past its timeout and was killed by "
                                    "SIGKILL; 0 retries used")


def test_the_hang_clock_runs_from_the_last_progress_in_the_heartbeat(tmp_path):
    """Progress for 25 s, then none: stopped hang_timeout after the last progress, not
    after the attempt's start."""
    hangs = ScriptedAttempt(progress_for=25, on_sigterm=75)
    job = Job(tmp_path, [hangs], hang_timeout=10, stop_grace=5, retry=RetryPolicy(retries=0))
    assert job.run() == "failed"
    [(when, name)] = hangs.signals
    assert name == "SIGTERM" and 25 + 10 < when <= 25 + 10 + POLL
    assert job.reasons() == ["hang"]
    assert "made no progress for 10s" in "\n".join(job.messages)


def test_without_a_heartbeat_the_hang_clock_runs_from_the_start(tmp_path):
    silent = ScriptedAttempt(on_sigterm=75)
    job = Job(tmp_path, [silent], hang_timeout=10, stop_grace=5, retry=RetryPolicy(retries=0))
    assert job.run() == "failed"
    [(when, _name)] = silent.signals
    assert 10 < when <= 10 + POLL


def test_retry_delays_back_off_up_to_the_max_delay(tmp_path):
    attempts = [ScriptedAttempt(code=1, exit_after=2) for _ in range(4)]
    job = Job(tmp_path, attempts, retry=RetryPolicy(retries=3, delay=4, backoff=3,
                                                    max_delay=10))
    assert job.run() == "failed"
    assert len(job.started) == 4
    for gap, delay in zip(job.gaps(), [4, 10, 10], strict=True):  # 4, 12 -> 10, 36 -> 10
        assert delay <= gap <= delay + POLL, job.gaps()
    said = "\n".join(job.messages)
    assert "retry 1/3 in 4 s" in said and "retry 3/3 in 10 s" in said
    assert job.row()["message"] == "attempt 4 exited with code 1; 3 retries used"


def test_a_stop_during_a_retry_wait_ends_the_job_without_another_attempt(tmp_path):
    job = Job(tmp_path, [ScriptedAttempt(code=1, exit_after=1), ScriptedAttempt()],
              retry=RetryPolicy(retries=3, delay=600))

    def stop_while_retrying(row):
        if row["status"] == "retrying":
            job.table.update(job.id, stop_requested=1)  # what `trainguard stop` does

    job.on_tick = stop_while_retrying
    assert job.run() == "stopped"
    assert len(job.started) == 1
    assert job.clock.monotonic() < 1 + 2 * POLL  # it did not sit out the 600 s
    assert job.row()["message"] == "stopped on request after attempt 1"


def test_the_budget_stops_the_attempt_in_time_to_save_within_it(tmp_path):
    # $3600 an hour is $1 a second: with a $14 budget, a 5 s grace and two polls of slack,
    # the attempt is asked to stop at 8 s of its time.
    saves = ScriptedAttempt(on_sigterm=75, term_seconds=2)
    job = Job(tmp_path, [saves], gpu_hourly_usd=3600, budget_usd=14, stop_grace=5)
    assert job.run() == "stopped"
    [(when, name)] = saves.signals
    assert name == "SIGTERM" and 8 <= when <= 8 + POLL
    row = job.row()
    assert "budget reached" in row["message"] and row["cost_usd"] <= 14


def test_a_supervisor_that_fails_stops_its_attempt_within_the_stop_grace(tmp_path,
                                                                          monkeypatch):
    stuck = ScriptedAttempt(on_sigterm=None)
    job = Job(tmp_path, [stuck], stop_grace=8)

    def broken(run_dir):
        if stuck.elapsed() >= 5:
            raise RuntimeError("a bug in the supervisor")
        return None

    monkeypatch.setattr(supervisor_module, "read_heartbeat", broken)
    assert job.run() == "failed"
    (term_at, term), (kill_at, kill) = stuck.signals
    assert (term, kill) == ("SIGTERM", "SIGKILL") and 5 <= term_at <= 5 + POLL
    assert 8 <= kill_at - term_at <= 8 + POLL
    assert job.row()["message"] == ("the supervisor failed (RuntimeError: a bug in the "
                                    "supervisor); the attempt it watched was stopped")
