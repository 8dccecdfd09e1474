"""The local supervisor with real processes: detach, retries with delays, hangs, timeouts,
graceful stop, sync during training, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.jobcli import committed_on_signal, tg, wait_for
from trainguard import CheckpointManager
from trainguard.errors import JobNotFound
from trainguard.launch import JobTable

ROOT = Path(__file__).resolve().parents[2]
JOB = "tests/integration/launch_scripts/job.py"


def job_row(job_id):
    return JobTable().get(job_id)


def test_crashes_twice_then_succeeds_resuming_with_delays(home, tmp_path):
    run_dir = tmp_path / "run"
    result = tg("run", JOB, "--run-dir", run_dir, "--retries", 3, "--retry-delay", "1s",
                "--backoff", 2, "--", "--steps", 30, "--crash-attempts", 2, "--crash-at", 12)
    assert result.returncode == 0, result.stderr + result.stdout
    job_id = result.stdout.split()[1]
    table = JobTable()
    attempts = table.attempts(job_id)
    assert [(a.exit_code, a.reason) for a in attempts] == [(1, "exited"), (1, "exited"),
                                                           (0, "exited")]
    for n in (1, 2):  # streamed to stderr as it ran; the retry's line names the error
        assert (f"attempt {n} exited with code 1 (RuntimeError: injected crash at step 12 on "
                f"attempt {n}); retry {n}/3 in {n} s") in result.stderr
    gaps = [b.started - a.ended for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps  # 1 s, then 1 s x 2
    logs = [(home / "jobs" / job_id / f"attempt-{n}.log").read_text() for n in (1, 2, 3)]
    assert "starts after step 0" in logs[0]
    # The crash inside step 12 committed an error checkpoint labelled 11 but tagged not
    # resumable (it may hold half of step 12): the retries resume from step 10's commit.
    assert "starts after step 10" in logs[1] and "starts after step 10" in logs[2]
    assert CheckpointManager(run_dir).latest_valid().step == 30
    assert job_row(job_id)["status"] == "succeeded"


def test_detached_job_survives_its_launcher_process_group(home, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        f"{sys.executable} -m trainguard run --detach {JOB} --run-dir {run_dir} -- "
        f"--steps 40 --sleep 0.05; sleep 60",
        shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    job_id = launcher.stdout.readline().strip()
    assert len(job_id) == 8, launcher.stderr.read()
    os.killpg(launcher.pid, signal.SIGKILL)  # the terminal, the shell, the launcher: gone
    launcher.wait()
    wait_for(lambda: job_row(job_id)["status"] in ("succeeded", "failed"), what="job end")
    assert job_row(job_id)["status"] == "succeeded"
    assert CheckpointManager(run_dir).latest_valid().step == 40


def attempt_seconds(tmp_path) -> int:
    """Whole seconds an attempt needs to start and make progress here: twice what a run of
    the job for one step takes (importing torch alone: seconds on a loaded 2-core machine)
    plus 2, at least 3."""
    env = {**os.environ, "TRAINGUARD_RUN_DIR": str(tmp_path / "probe")}
    started = time.monotonic()
    subprocess.run([sys.executable, JOB, "--steps", "1", "--sleep", "0"], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=180)
    return max(3, int(2 * (time.monotonic() - started)) + 2)


def test_a_hang_is_killed_and_retried(home, tmp_path):
    # The hang clock runs from the attempt's start until its first heartbeat.
    result = tg("run", JOB, "--run-dir", tmp_path / "run", "--hang-timeout",
                f"{attempt_seconds(tmp_path)}s", "--stop-grace", "2s", "--retry-delay", "0", "--",
                "--steps", 20, "--hang-at", 7)
    assert result.returncode == 0, result.stderr + result.stdout
    job_id = result.stdout.split()[1]
    reasons = [a.reason for a in JobTable().attempts(job_id)]
    assert reasons == ["hang; killed by SIGKILL", "exited"]  # asleep: SIGTERM was not enough


def test_a_timeout_is_retried_and_resumes(home, tmp_path):
    timeout = attempt_seconds(tmp_path)
    steps = int(timeout / 0.1) + 20  # more work than one attempt has time for
    result = tg("run", JOB, "--run-dir", tmp_path / "run", "--timeout", f"{timeout}s",
                "--retries", 5, "--retry-delay", "0", "--", "--steps", steps, "--sleep", 0.1)
    assert result.returncode == 0, result.stderr + result.stdout
    job_id = result.stdout.split()[1]
    attempts = JobTable().attempts(job_id)
    assert attempts[0].reason == "timeout" and attempts[-1].exit_code == 0
    log2 = (home / "jobs" / job_id / "attempt-2.log").read_text()
    assert "starts after step 0" not in log2  # the SIGTERM'd attempt committed its progress


def test_stop_commits_and_ends_stopped(home, tmp_path):
    run_dir = tmp_path / "run"
    started = tg("run", "--detach", JOB, "--run-dir", run_dir, "--", "--steps", 100000,
                 "--sleep", 0.05)
    job_id = started.stdout.strip()
    wait_for(lambda: (job_row(job_id)["step"] or 0) >= 8, what="training progress")
    stopped = tg("stop", job_id)
    assert stopped.returncode == 0 and f"job {job_id} stopped" in stopped.stdout, stopped.stderr
    row = job_row(job_id)
    latest = CheckpointManager(run_dir).latest_valid()
    assert row["status"] == "stopped" and latest.step >= 8
    assert latest.reason != "periodic" or latest.step % 5 == 0
    status = json.loads(tg("status", job_id, "--json").stdout)
    assert status["status"] == "stopped" and status["attempts"][0]["exit_code"] == 75


def test_sync_during_training_copies_a_verified_committed_checkpoint(home, tmp_path):
    run_dir, dest = tmp_path / "run", tmp_path / "copy"
    job_id = tg("run", "--detach", JOB, "--run-dir", run_dir, "--", "--steps", 100000,
                "--sleep", 0.02).stdout.strip()
    wait_for(lambda: job_row(job_id)["last_commit_step"], what="a first commit")
    synced = tg("sync", job_id, dest)
    tg("stop", job_id, "--now")
    assert synced.returncode == 0, synced.stderr
    step = int(synced.stdout.split("step ")[1].split()[0])
    copy = CheckpointManager(dest)
    assert copy.latest_valid().step == step and copy.verify(step).valid
    assert step % 5 == 0  # a cadence commit, never a half-written one


USAGE = 2  # click's code for a bad option or argument


@pytest.mark.parametrize("args, message, code", [
    (["status", "nosuchjob"], "no job 'nosuchjob'", JobNotFound.exit_code),
    (["run", "missing.py"], "missing.py does not exist", USAGE),
    (["run", JOB, "--retries", "-1"], "-1 is not in the range", USAGE),
    (["run", JOB, "--timeout", "soon"], "cannot read 'soon' as a duration", USAGE),
    (["logs", "nosuchjob"], "no job 'nosuchjob'", JobNotFound.exit_code),
])
def test_bad_input_gets_one_clear_line(home, args, message, code):
    result = tg(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_budget_stops_the_job_gracefully(home, tmp_path):
    # $3600 an hour is $1 a second. The supervisor asks the job to save and stop when its
    # cost plus the stop grace and two polls (1 s) would reach the budget: with a grace of
    # `seconds` and a budget of 2 * seconds + 1, at `seconds` of attempt time. Both are
    # measured here, not fixed: the script has started and is stepping by then, and has a
    # whole measured start's time to save (a fixed 8 s, then 5 s grace, assumed torch
    # imports in a few seconds; a 1 s grace was seen to run out on a loaded machine).
    seconds = attempt_seconds(tmp_path)
    budget = 2 * seconds + 1
    result = tg("run", JOB, "--run-dir", tmp_path / "run", "--gpu-hourly-usd", 3600,
                "--budget-usd", budget, "--stop-grace", f"{seconds}s", "--", "--steps",
                100000, "--sleep", 0.02)
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = result.stdout.split()[1]
    row = job_row(job_id)
    assert row["status"] == "stopped" and "budget reached" in row["message"]
    assert row["cost_usd"] <= budget
    assert JobTable().attempts(job_id)[0].exit_code == 75  # it saved and committed
    log = (home / "jobs" / job_id / "attempt-1.log").read_text()
    committed_on_signal(tmp_path / "run", log)  # the step it had reached is committed


def test_a_moved_script_and_a_dead_supervisor_are_handled(home, tmp_path):
    script = tmp_path / "train.py"
    script.write_text((ROOT / JOB).read_text())
    run_dir = tmp_path / "run"
    job_id = tg("run", "--detach", script, "--run-dir", run_dir, "--", "--steps", 100000,
                "--sleep", 0.05).stdout.strip()
    wait_for(lambda: (job_row(job_id)["step"] or 0) >= 3, what="training progress")
    script.unlink()  # e.g. a `git checkout` while the job runs
    assert tg("status", job_id).returncode == 0  # still listed and watched
    row = job_row(job_id)
    os.kill(row["supervisor_pid"], signal.SIGKILL)  # the supervisor dies
    wait_for(lambda: "lost" in tg("ps").stdout, what="ps to show the job lost")
    stopped = tg("stop", job_id)
    assert stopped.returncode == 0 and "training process was stopped too" in stopped.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(row["child_pid"], 0)
    assert job_row(job_id)["status"] == "stopped"
    # The orphan saved on SIGTERM: the step it had reached is committed (by the preempted
    # save, or by the cadence save just before, when the signal fell right after it).
    committed_on_signal(run_dir, (home / "jobs" / job_id / "attempt-1.log").read_text())


def test_torchrun_job_killed_rank_is_retried_and_resumes(home, tmp_path):
    run_dir = tmp_path / "run"
    result = tg("run", "tests/integration/dist_scripts/ddp_train.py", "--run-dir", run_dir,
                "--nproc-per-node", 2, "--retries", 2, "--retry-delay", "0", "--",
                run_dir, 12, tmp_path / "out.pt", 7, tmp_path / "crashed", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1]
    attempts = JobTable().attempts(job_id)
    assert [a.exit_code == 0 for a in attempts] == [False, True]  # rank 1 died, then resumed
    assert CheckpointManager(run_dir).latest_valid().step == 12
    assert (tmp_path / "out.pt").exists()


EXIT_CODES = "tests/integration/launch_scripts/exit_codes.py"


def test_torchrun_attempt_whose_workers_all_exit_75_resumes_without_a_retry(home, tmp_path):
    # --retries 0: were the first attempt (torchrun itself exits 1) counted as a failure,
    # the job would end failed after it.
    result = tg("run", EXIT_CODES, "--run-dir", tmp_path / "run", "--nproc-per-node", 2,
                "--retries", 0, "--", "75,75", "0,0")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1]
    row = job_row(job_id)
    assert (row["status"], row["failures"], row["attempt"]) == ("succeeded", 0, 2)
    assert [(a.exit_code, a.reason) for a in JobTable().attempts(job_id)] == [
        (75, "exited; workers by local rank: {0: 75, 1: 75}"),
        (0, "exited; workers by local rank: {0: 0, 1: 0}")]
    log1 = (home / "jobs" / job_id / "attempt-1.log").read_text()
    assert "torchrun exited with code 1" in log1 and "the attempt's exit code: 75" in log1
    for line in ("rank 1 attempt 1 exits 75", "rank 0 attempt 2 exits 0"):  # the workers' own
        assert line in result.stderr.splitlines(), result.stderr            # output, streamed


def test_torchrun_attempt_with_one_worker_75_and_one_failed_is_a_failure(home, tmp_path):
    result = tg("run", EXIT_CODES, "--run-dir", tmp_path / "run", "--nproc-per-node", 2,
                "--retries", 0, "--", "75,3")
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = result.stdout.split()[1]
    row = job_row(job_id)
    assert (row["status"], row["failures"]) == ("failed", 1)
    assert "{0: 75, 1: 3}" in row["message"] and "0 retries used" in row["message"]
    assert [(a.exit_code, a.reason) for a in JobTable().attempts(job_id)] == [
        (1, "exited; workers by local rank: {0: 75, 1: 3}")]


def test_bad_torchrun_options(home):
    result = tg("run", JOB, "--nnodes", "2")
    assert result.returncode == USAGE and "rdzv" in result.stderr.lower(), result.stderr


def test_torchrun_elastic_restart_within_one_attempt_ends_bit_identical(home, tmp_path):
    """--max-restarts: torchrun restarts the workers itself after rank 1 is SIGKILLed;
    the new round re-forms its gloo groups (a fresh rendezvous store per round) and
    resumes from the last commit, ending exactly where an uninterrupted run ends."""
    script = "tests/integration/dist_scripts/ddp_train.py"
    ref = tg("run", script, "--run-dir", tmp_path / "ref", "--nproc-per-node", 2, "--",
             tmp_path / "ref", 12, tmp_path / "ref.pt", timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    result = tg("run", script, "--run-dir", tmp_path / "run", "--nproc-per-node", 2,
                "--max-restarts", 1, "--retries", 0, "--",
                tmp_path / "run", 12, tmp_path / "out.pt", 7, tmp_path / "crashed", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "crashed").exists()  # rank 1 really died
    job_id = result.stdout.split()[1]
    assert [a.exit_code for a in JobTable().attempts(job_id)] == [0]  # one attempt
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "out.pt")
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
