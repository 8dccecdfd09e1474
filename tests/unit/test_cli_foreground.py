"""The foreground view of ``trainguard run``: following a log, the status line, the lines
shown per attempt, and the exit codes (no processes: a job table and rows made by hand)."""

from __future__ import annotations

import io

import pytest

from trainguard.cli.foreground import ForegroundView, LogFollower, exit_code, status_line
from trainguard.launch import JobTable


def test_a_follower_returns_whole_lines_and_the_rest_once_final(tmp_path):
    log = tmp_path / "attempt-1.log"
    follower = LogFollower(log)
    assert follower.lines() == []  # not written yet
    log.write_bytes(b"one\r\ntw")
    assert follower.lines() == ["one"]
    with open(log, "ab") as out:
        out.write("o\nthree \u00e9".encode())
    assert follower.lines() == ["two"]
    assert follower.lines(final=True) == ["three \u00e9"]
    assert follower.lines(final=True) == []


@pytest.mark.parametrize("status, signal, code", [
    ("succeeded", None, 0), ("failed", None, 1), ("stopped", None, 1),
    ("stopped", 2, 130), ("stopped", 15, 143), ("failed", 2, 1)])
def test_exit_codes(status, signal, code):
    assert exit_code(status, signal) == code


def row(**fields) -> dict:
    return {"id": "3f2a9c1e", "status": "running", "attempt": 1, "step": None, "total": None,
            "last_commit_step": None, "last_commit_at": None, "speed": None, "cost_usd": 0,
            "message": "attempt 1 running", "child_pid": 4242, **fields}


def test_the_status_line_says_what_is_known_and_no_eta_without_a_speed():
    assert status_line(row()) == "job 3f2a9c1e attempt 1  no heartbeat yet"
    live = row(step=120, total=1000, last_commit_step=115, last_commit_at=996.0, speed=22.0)
    assert status_line(live, now=1000.0) == ("job 3f2a9c1e attempt 1  step 120/1000  "
                                             "committed 115 (4s ago)  22.00 steps/s  eta 40s")
    waiting = row(status="retrying", step=120, total=1000, speed=None)
    assert status_line(waiting) == "job 3f2a9c1e attempt 1  waiting to retry  step 120/1000"


def view_of(tmp_path, tty: bool) -> tuple[ForegroundView, io.StringIO, JobTable]:
    stream = io.StringIO()
    table = JobTable(tmp_path / "home")
    return ForegroundView(table, stream=stream, tty=tty), stream, table


def test_without_a_terminal_output_and_one_line_per_attempt_event(tmp_path):
    view, stream, table = view_of(tmp_path, tty=False)
    job_dir = table.job_dir("3f2a9c1e")
    job_dir.mkdir(parents=True)
    (job_dir / "attempt-1.log").write_text("loss=1.0\nlast without newline")
    for _ in range(3):  # ticks while it runs: nothing is repeated
        view(row())
    view(row(child_pid=None))  # it ended: the unterminated line too
    view(row(status="retrying", child_pid=None, message="attempt 1 exited with code 1; "
                                                        "retry 1/3 in 0 s"))
    (job_dir / "attempt-2.log").write_text("again\n")
    view(row(attempt=2, message="attempt 2 running (retry 1/3)"))
    view(row(attempt=2, status="succeeded", child_pid=None, message="attempt 2 succeeded"))
    view.close()
    assert stream.getvalue().splitlines() == [
        f"trainguard: job 3f2a9c1e: attempt 1 running; log: {job_dir / 'attempt-1.log'}",
        "loss=1.0",
        "last without newline",
        "trainguard: job 3f2a9c1e: attempt 1 exited with code 1; retry 1/3 in 0 s",
        f"trainguard: job 3f2a9c1e: attempt 2 running (retry 1/3); log: "
        f"{job_dir / 'attempt-2.log'}",
        "again",
    ]  # the final message is not here: it is the one line on stdout
    assert "\x1b" not in stream.getvalue()


def test_on_a_terminal_the_status_line_is_cleared_before_every_line(tmp_path):
    view, stream, table = view_of(tmp_path, tty=True)
    job_dir = table.job_dir("3f2a9c1e")
    job_dir.mkdir(parents=True)
    view(row())
    (job_dir / "attempt-1.log").write_text("loss=1.0\n")
    view(row(step=1))
    view.note("a warning")
    view.close()
    text = stream.getvalue()
    status = "\r\x1b[2Kjob 3f2a9c1e attempt 1  step 1"
    assert status + "\r\x1b[2Ktrainguard: a warning\n" in text  # never glued to the status
    assert "\r\x1b[2Kloss=1.0\n" in text
    assert text.endswith("\r\x1b[2K")  # closed: the status line is gone, the cursor at col 0


def test_a_ctrl_c_before_the_supervisor_runs_leaves_the_job_stopped_not_lost(tmp_path,
                                                                              monkeypatch):
    import click

    from trainguard.cli.foreground import supervise_in_foreground
    from trainguard.launch import JobSpec

    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    table = JobTable()

    def start(view):  # the job is recorded, then Ctrl-C lands before any handler
        table.create(JobSpec(str(script), run_dir=str(tmp_path / "run")))
        raise KeyboardInterrupt

    with pytest.raises(click.exceptions.Exit) as ended:
        supervise_in_foreground(table, start)
    assert ended.value.exit_code == 130
    (job,) = table.all()
    assert job["status"] == "stopped" and "before its first attempt" in job["message"]


def test_rm_is_refused_for_a_job_resumed_since_it_was_read(tmp_path, monkeypatch):
    from trainguard.launch import JobSpec
    from trainguard.launch.jobs import JobBusy, holds_run_dir

    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    table = JobTable()
    job = table.create(JobSpec(str(script), run_dir=str(tmp_path / "run")))
    table.update(job, status="stopped")
    table.reopen(job, holds_run_dir)  # `resume` in another process, after `rm` read it
    with pytest.raises(JobBusy):
        table.delete(job, holds=holds_run_dir)
    assert table.get(job)["status"] == "pending"
