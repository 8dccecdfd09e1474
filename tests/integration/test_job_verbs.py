"""The job verbs a person lives in, through the CLI in real processes: one job per run
directory, ``rm``, ``resume``, ``ps --status/--all``, ``logs --tail/--since``, and
statuses that say what happened."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.integration.jobcli import tg, wait_for
from trainguard.errors import JobBusy, RunDirBusy, TrainguardError
from trainguard.launch import JobSpec, JobTable
from trainguard.launch.logs import LogClock

ROOT = Path(__file__).resolve().parents[2]
JOB = "tests/integration/launch_scripts/job.py"


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainguard: error: "), result.stderr
    return lines[0]


def test_one_job_per_run_dir_then_stop_resume_and_rm(home, tmp_path):
    run_dir = tmp_path / "run"
    job = tg("run", "--detach", JOB, "--run-dir", run_dir, "--", "--steps", 100000,
             "--sleep", 0.05).stdout.strip()
    table = JobTable()
    wait_for(lambda: (table.get(job)["last_commit_step"] or 0) >= 5, what="a first commit")

    second = tg("run", "--detach", JOB, "--run-dir", run_dir)
    error = one_line_error(second, RunDirBusy.exit_code)
    assert f"job {job} already runs on {run_dir}" in error and "--run-dir" in error
    assert len(table.all()) == 1  # the refused launch left nothing behind
    busy = one_line_error(tg("rm", job), JobBusy.exit_code)
    assert job in busy and "trainguard stop" in busy

    assert tg("stop", job).returncode == 0
    committed = table.get(job)["last_commit_step"]
    resumed = tg("resume", job, "--detach")
    assert resumed.returncode == 0 and resumed.stdout.strip() == job, resumed.stderr
    wait_for(lambda: (table.get(job)["step"] or 0) > committed + 3, what="the resumed run")
    row = table.get(job)
    assert row["attempt"] == 2 and row["status"] == "running"
    log2 = (home / "jobs" / job / "attempt-2.log").read_text()
    assert f"starts after step {committed}" in log2  # from its last commit, not from 0

    assert tg("stop", job).returncode == 0
    assert [a.reason for a in table.attempts(job)] == ["stopped", "stopped"]
    removed = tg("rm", job)
    assert removed.returncode == 0 and f"its run directory {run_dir} is kept" in removed.stdout
    assert json.loads(tg("ps", "--all", "--json").stdout) == []
    assert not (home / "jobs" / job).exists() and (run_dir / "checkpoints").is_dir()
    again = tg("run", "--detach", JOB, "--run-dir", run_dir, "--", "--steps", 1)
    assert again.returncode == 0, again.stderr  # the run dir is free again


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_ps_filters_lost_jobs_and_honest_columns(home, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    table = JobTable()

    def job(status, **fields):
        job_id = table.create(JobSpec(str(script), run_dir=str(tmp_path / status)))
        table.update(job_id, status=status, **fields)
        return job_id

    old = job("succeeded")
    table.sql("UPDATE jobs SET updated = ? WHERE id = ?", (time.time() - 3 * 86400, old))
    stopped = job("stopped", speed=23.8, step=10, total=100000, attempt=1)
    table.start_attempt(stopped, 1)
    table.end_attempt(stopped, 1, -9, "stopped")
    lost = job("running", supervisor_pid=_dead_pid(), child_pid=_dead_pid())

    ps = tg("ps")
    assert old not in ps.stdout and stopped in ps.stdout and lost in ps.stdout
    assert old in tg("ps", "--all").stdout
    only = json.loads(tg("ps", "--status", "lost", "--json").stdout)
    assert [r["id"] for r in only] == [lost] and only[0]["status"] == "lost"
    line = next(row for row in ps.stdout.splitlines() if row.startswith(stopped))
    assert "/s" not in line and "23.8" not in line  # an ended job has no speed, no ETA
    assert "killed by SIGKILL" in tg("status", stopped).stdout

    removed = tg("rm", "--lost")
    assert removed.returncode == 0 and f"removed job {lost}" in removed.stdout
    assert {j["id"] for j in table.all()} == {old, stopped}
    refused = tg("rm")
    assert refused.returncode == 2 and "--lost for every lost one" in refused.stderr  # usage


def test_logs_tail_and_since_across_attempts(home, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    table = JobTable()
    job = table.create(JobSpec(str(script), run_dir=str(tmp_path / "run")))
    now = time.time()
    for n, first in ((1, now - 5 * 3600), (2, now - 3000)):  # a line every 10 min
        path = table.job_dir(job) / f"attempt-{n}.log"
        written = [first]
        clock = LogClock(path, clock=lambda written=written: written[0])
        for i in range(5):
            with open(path, "a") as out:
                out.write(f"attempt {n} line {i}\n")
            clock.tick()
            written[0] += 600
    table.update(job, attempt=2, status="failed")

    assert tg("logs", job, "--tail", 2).stdout == "attempt 2 line 3\nattempt 2 line 4\n"
    recent = tg("logs", job, "--since", "25m").stdout  # lines 3 and 4: 20 and 10 min ago
    assert recent == "attempt 2 line 3\nattempt 2 line 4\n"
    assert tg("logs", job, "--since", "5m").stdout == ""
    both = tg("logs", job, "--since", "6h", "--tail", 1).stdout
    assert both == "--- attempt 1 ---\nattempt 1 line 4\n--- attempt 2 ---\nattempt 2 line 4\n"
    assert tg("logs", job, "--attempt", 1, "--tail", 1).stdout == "attempt 1 line 4\n"
    assert "no attempt 3" in one_line_error(tg("logs", job, "--attempt", 3),
                                           TrainguardError.exit_code)
    assert "neither a duration" in tg("logs", job, "--since", "yesterday-ish").stderr


def test_a_failed_job_resumed_in_the_foreground_goes_on_from_its_last_commit(home, tmp_path):
    failed = tg("run", JOB, "--run-dir", tmp_path / "run", "--retries", 0, "--", "--steps", 20,
                "--crash-attempts", 1, "--crash-at", 8)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    job = failed.stdout.split()[1]
    committed = JobTable().get(job)["last_commit_step"]  # the newest a resume can use:
    assert committed == 5  # not the crash's own save (step 7, kept for inspection)

    resumed = tg("resume", job)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.splitlines() == [f"job {job} succeeded: attempt 2 succeeded"]
    assert f"attempt 2 starts after step {committed}" in resumed.stderr  # streamed output
    assert [a.exit_code for a in JobTable().attempts(job)] == [1, 0]
    assert "nothing to resume" in one_line_error(tg("resume", job), TrainguardError.exit_code)


def test_two_resumes_at_once_start_one_supervisor(home, tmp_path):
    from trainguard.launch.jobs import JobBusy, holds_run_dir

    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    table = JobTable()
    job = table.create(JobSpec(str(script), run_dir=str(tmp_path / "run")))
    table.update(job, status="stopped")
    # Both launchers read the row as stopped; the table lets one of them reopen it.
    table.reopen(job, holds_run_dir, supervisor_pid=os.getpid())
    try:
        JobTable().reopen(job, holds_run_dir, supervisor_pid=os.getpid())
    except JobBusy as exc:
        assert "resumed by another process" in str(exc)
    else:
        raise AssertionError("a second resume of a job being resumed was accepted")


def test_logs_follow_shows_an_attempts_last_lines_before_the_next_one(home, tmp_path):
    from trainguard.launch.backends import LocalBackend

    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    table = JobTable()
    job = table.create(JobSpec(str(script), run_dir=str(tmp_path / "run")))
    logs = table.job_dir(job)
    (logs / "attempt-1.log").write_text("step 1\n")
    table.update(job, attempt=1, status="running")
    follow = LocalBackend(table).logs(table.get(job), follow=True)
    assert next(follow) == "step 1\n"
    # Between two polls: attempt 1 commits and exits 75, attempts 2 and 3 start at once.
    with open(logs / "attempt-1.log", "a") as out:
        out.write("preempted: step 1 committed\n")
    (logs / "attempt-2.log").write_text("attempt 2\n")
    (logs / "attempt-3.log").write_text("attempt 3\n")
    table.update(job, attempt=3, status="succeeded")
    rest = "".join(follow)
    assert rest == ("preempted: step 1 committed\n--- attempt 2 ---\nattempt 2\n"
                    "--- attempt 3 ---\nattempt 3\n")
