"""Real processes, real signals: preemption finishes the current step, commits it and exits
with EXIT_RESUME; an exception commits an error checkpoint and exits with the original
traceback; a hung loop keeps beating but stops refreshing its progress."""

from __future__ import annotations

import json
import signal
import time

from tests.integration.run_scripts.child import (
    events,
    latest_step,
    read_until,
    start,
    step_at_least,
)
from trainguard import CheckpointManager
from trainguard.run import EXIT_RESUME, read_heartbeat


def test_sigint_mid_step_finishes_the_step_commits_it_and_exits_resume(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "stderr"
    proc = start(run_dir, "--wait-signal-at", "5", stderr_path=log)
    read_until(proc, step_at_least("waiting", 5))  # step 5's body is running now
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what Modal sends
    assert proc.wait(timeout=25) == EXIT_RESUME, log.read_text()[-3000:]
    assert time.monotonic() - sent < 25  # inside the default deadline
    assert proc.stdout.read() == "step 5\n"  # the body ran to its end, and no step after...
    info = CheckpointManager(run_dir).latest_valid()
    assert info is not None and info.step == 5  # ...and that very step was committed
    assert info.reason == "preempted" and info.manifest.tags["signal"] == "SIGINT"
    assert "KeyboardInterrupt" not in log.read_text()
    assert read_heartbeat(run_dir).status == "preempted"

    resumed = start(run_dir, "--total", "8", stderr_path=log)  # "resume me"
    out, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0
    assert out.split()[:2] == ["begin", "6"]
    assert latest_step(run_dir) == 8


def test_exception_commits_an_error_checkpoint_and_reraises(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "stderr"
    proc = start(run_dir, "--raise-at", "8", stderr_path=log)
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    stderr = log.read_text()
    # The original exception, with its traceback down to the line that raised it.
    assert "ValueError: boom at step 8" in stderr
    assert 'raise ValueError(f"boom at step {step}")' in stderr
    info = CheckpointManager(run_dir).latest_valid()
    assert info.step == 7 and info.reason == "error"  # step 6 was periodic; 7 is new
    assert info.manifest.tags["error"] == "ValueError: boom at step 8"
    assert CheckpointManager(run_dir).verify(7).valid
    assert events(run_dir, "error")[-1]["step"] == 7
    assert read_heartbeat(run_dir).status == "failed"


def _heartbeat_when(run_dir, condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = read_heartbeat(run_dir)
        except ValueError:
            record = None
        if record is not None and condition(record):
            return record
        time.sleep(0.05)
    raise AssertionError(f"heartbeat never met the condition: {read_heartbeat(run_dir)}")


def test_hung_loop_keeps_beating_but_stops_refreshing_progress(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "stderr"
    proc = start(run_dir, "--hang-at", "5", "--heartbeat", "0.1", "--progress", "0.3",
                 stderr_path=log)
    try:
        read_until(proc, step_at_least("begin", 5))  # step 5's body hangs from here on
        first = _heartbeat_when(run_dir, lambda r: r.step == 4 and r.phase == "train")
        later = _heartbeat_when(run_dir, lambda r: r.beat > first.beat + 1.0)
        # The process is alive (its beats go on) but the loop made no progress since.
        assert later.status == "running" and later.pid == proc.pid
        assert later.step == 4
        assert later.last_progress == first.last_progress
        assert later.seconds_since_progress(now=later.beat) > 1.0
        assert later.stalled(timeout=0.5, now=later.beat)
        assert later.seconds_since_beat() < 5.0
        # ... and the stall is said in the log, not left to be discovered.
        deadline = time.monotonic() + 60  # a bound on a wait, not a speed
        while "no progress for" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no progress for" in log.read_text()
        assert json.loads((run_dir / "heartbeat.json").read_text())["phase"] == "train"
    finally:
        proc.kill()
        proc.wait(timeout=30)
