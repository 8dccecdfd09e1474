"""Heartbeats: the file, progress versus beats, progress lines, and write failures."""

from __future__ import annotations

import json
import logging
import os

import pytest

from trainguard.run import HEARTBEAT_FILE, Run, read_heartbeat
from trainguard.run.heartbeat import Heartbeat, Phase


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path, report_every: float = 30.0):
    clock = Clock()
    beat = Heartbeat(tmp_path / HEARTBEAT_FILE, interval=10.0, report_every=report_every,
                     wall_clock=clock)
    return beat, clock


def test_file_holds_step_phase_and_both_clocks(tmp_path):
    beat, clock = make(tmp_path)
    beat.progress(step=12, total=100)
    clock.now += 5
    beat.beat()
    record = read_heartbeat(tmp_path)
    assert (record.step, record.total, record.phase, record.status) == (12, 100, "start", "running")
    assert record.pid == os.getpid() and record.version == 1
    assert record.beat - record.last_progress == 5.0
    assert set(json.loads((tmp_path / HEARTBEAT_FILE).read_text())) >= {
        "pid", "host", "status", "phase", "step", "total", "phase_started", "phase_done",
        "phase_total", "last_progress", "beat", "started", "interval"}


def test_beats_without_progress_mark_a_stall(tmp_path):
    beat, clock = make(tmp_path)
    beat.progress(step=4)
    beat.beat()
    first = read_heartbeat(tmp_path)
    for _ in range(6):  # the writer keeps beating; the loop does nothing
        clock.now += 10
        beat.beat()
    stuck = read_heartbeat(tmp_path)
    assert stuck.beat == first.beat + 60 and stuck.last_progress == first.last_progress
    assert stuck.seconds_since_progress(now=clock.now) == 60
    assert stuck.stalled(timeout=30, now=clock.now)
    assert not stuck.stalled(timeout=90, now=clock.now)
    beat.progress(step=5)
    beat.beat()
    assert not read_heartbeat(tmp_path).stalled(timeout=30, now=clock.now)


def test_stopped_runs_are_never_stalled(tmp_path):
    beat, clock = make(tmp_path)
    beat.stop("finished")
    clock.now += 1000
    record = read_heartbeat(tmp_path)
    assert record.status == "finished" and not record.stalled(1, now=clock.now)


def test_long_phases_log_progress_lines_and_stalls_warn(tmp_path, caplog):
    beat, clock = make(tmp_path, report_every=30)
    phase = Phase(beat, "validate", 100)
    beat.set_phase("validate", total=100)
    with caplog.at_level(logging.INFO, logger="trainguard"):
        clock.now += 10
        phase.advance(40)
        beat.beat()
        assert caplog.text == ""  # not due yet
        clock.now += 25
        beat.beat()
        assert "validate: 40/100 (40%) running 35s at step 0" in caplog.text
        assert "no progress" not in caplog.text
        caplog.clear()
        clock.now += 40
        beat.beat()
        assert "no progress for 1m05s" in caplog.text
        caplog.clear()
        beat.set_phase("train")
        clock.now += 31
        beat.beat()
        assert "no progress for 31s (phase train at step 0): is a step hung?" in caplog.text
    assert read_heartbeat(tmp_path).phase == "train"


def test_a_failing_write_is_logged_and_training_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    beat = Heartbeat(blocker / HEARTBEAT_FILE, interval=10, report_every=30)
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        assert beat._write_logged() is False
        assert beat._write_logged() is False
    assert isinstance(beat.error, OSError)
    assert caplog.text.count("cannot write heartbeat") == 1  # not once per beat
    beat.path = tmp_path / HEARTBEAT_FILE
    assert beat._write_logged() is True and beat.error is None


def test_the_writer_thread_beats_on_its_own(tmp_path):
    beat = Heartbeat(tmp_path / HEARTBEAT_FILE, interval=0.01, report_every=30)
    beat.start()
    try:
        first = read_heartbeat(tmp_path).beat
        for _ in range(500):  # bounded wait for a later beat from the thread
            record = read_heartbeat(tmp_path)
            if record.beat > first:
                break
            beat._stop.wait(0.01)
        assert record.beat > first
    finally:
        beat.stop("finished")
    assert not beat._thread.is_alive()


def test_read_heartbeat_missing_and_garbled(tmp_path):
    assert read_heartbeat(tmp_path) is None
    (tmp_path / HEARTBEAT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_heartbeat(tmp_path)
    (tmp_path / HEARTBEAT_FILE).write_text("{}")
    with pytest.raises(ValueError, match="lacks heartbeat fields"):
        read_heartbeat(tmp_path)


def test_run_phase_shows_in_the_heartbeat(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    with Run(tmp_path, save_every_steps=10, heartbeat_seconds=3600, tensorboard=False) as run:
        run.track(model=model)
        for _step in run.steps(1):
            with run.phase("validate", total=3) as phase:
                phase.advance()
                live = run._s.heartbeat.snapshot()
                assert live["phase"] == "validate"
                assert (live["phase_done"], live["phase_total"]) == (1, 3)
            assert run._s.heartbeat.snapshot()["phase"] == "train"
        with pytest.raises(ValueError, match="phase name"):
            with run.phase(""):
                pass
    assert read_heartbeat(tmp_path).status == "finished"


def test_a_resumed_loop_shows_its_step_and_total_at_once(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    with Run(tmp_path, save_every_steps=3, heartbeat_seconds=3600, tensorboard=False) as run:
        run.track(model=model)
        for _ in run.steps(3):
            pass
    with Run(tmp_path, save_every_steps=3, heartbeat_seconds=3600, tensorboard=False) as run:
        run.track(model=model)
        for _ in run.steps(6):  # the writer thread would not beat for an hour
            beat = read_heartbeat(tmp_path)
            assert (beat.step, beat.total) == (3, 6)
            break
