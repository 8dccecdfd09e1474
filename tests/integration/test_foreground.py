"""``trainguard run`` in the foreground, as a person sees it (a real terminal, and pipes),
and the job's recorded status, as ``trainguard status --json`` reads it.

Most scripts here import trainguard but not torch: they exit, fail, get killed or beat a
heartbeat by hand, which is all these tests watch. The terminal test opens a real Run.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.integration.jobcli import committed_on_signal, tg, wait_for
from trainguard.errors import RunDirError
from trainguard.launch import JobSpec, JobTable, RetryPolicy, Supervisor

ROOT = Path(__file__).resolve().parents[2]
LOUD = "tests/integration/launch_scripts/loud.py"

SCRIPTS = {
    # Fails on its first attempt (after some output on both streams), succeeds on the next;
    # with a `release` file named, the second attempt waits for it first.
    "flaky.py": """
        import os, sys, time
        counter, release = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
        n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
        open(counter, "w").write(str(n))
        print(f"attempt {n} says hello", flush=True)
        print(f"attempt {n} to stderr", file=sys.stderr, flush=True)
        if n == 1:
            raise RuntimeError("injected failure on attempt 1")
        while release and not os.path.exists(release):
            time.sleep(0.1)
    """,
    "missing_import.py": """
        print("starting", flush=True)
        import no_such_module_for_trainguard_tests
    """,
    "killed.py": """
        import os, signal
        print("about to be killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    "ok.py": """
        print("ok", flush=True)
    """,
    # A heartbeat with steady progress, as a Run writes it, without torch.
    "beating.py": """
        import os, time
        from trainguard.run.heartbeat import HEARTBEAT_FILE, Heartbeat
        run_dir = os.environ["TRAINGUARD_RUN_DIR"]
        os.makedirs(run_dir, exist_ok=True)
        beat = Heartbeat(os.path.join(run_dir, HEARTBEAT_FILE), interval=0.2, report_every=3600)
        beat.start()
        step = 0
        while True:
            step += 1
            beat.progress(step, total=1_000_000)
            time.sleep(0.02)
    """,
    "sleeper.py": """
        import time
        print("up", flush=True)
        time.sleep(600)
    """,
}


def script(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(SCRIPTS[name]))
    return path


def final_line(result: subprocess.CompletedProcess) -> str:
    """stdout of a foreground run: exactly one line, its final word."""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout + result.stderr[-3000:]
    return lines[0]


def status_json(job_id: str) -> dict:
    result = tg("status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- a terminal ---------------------------------------------------------------------------

def run_on_a_terminal(args: list[str], interrupt_when, hang_up=False) -> tuple[int, str]:
    """Run ``trainguard ARGS`` with a pty as its controlling terminal; type Ctrl-C (or,
    ``hang_up``, close the terminal) once ``interrupt_when(output so far)`` holds. Its exit
    code and everything it printed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))

    def own_terminal():  # as a shell starts a job: its own session, the pty its terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "trainguard", *args], cwd=ROOT,
                            stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    output, interrupted = b"", False
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed its end
                    break
                if not chunk:
                    break
                output += chunk
            if not interrupted and interrupt_when(output.decode(errors="replace")):
                interrupted = True
                if hang_up:  # the window closes: the kernel sends SIGHUP to the session
                    os.close(master)
                    master = None
                    break
                os.write(master, b"\x03")  # what the key does: SIGINT to the foreground group
        assert interrupted, output.decode(errors="replace")[-3000:]
        return proc.wait(timeout=120), output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        if master is not None:
            os.close(master)


def test_ctrl_c_on_a_terminal_streams_then_commits_and_exits_130(home, tmp_path):
    run_dir = tmp_path / "run"
    status_drawn = "\x1b[2Kjob "

    def committed_and_shown(text: str) -> bool:  # the status line has shown a commit
        return text.count("loss=") >= 3 and any(
            "committed" in part.split("\r")[0] for part in text.split(status_drawn)[1:])

    code, text = run_on_a_terminal(["run", LOUD, "--run-dir", str(run_dir), "--no-preflight",
                                    "--", "--sleep", "0.05"], committed_and_shown)
    job_id = JobTable().all()[0]["id"]
    row = JobTable().get(job_id)
    assert code == 130, text[-3000:]
    assert "loss=1.0000 step=1" in text and "loss=0.5000 step=2" in text  # its own lines
    assert f"\r\x1b[2Kjob {job_id} attempt 1  step " in text  # the live status line
    final = f"job {job_id} stopped: stopped by SIGINT (Ctrl-C) after attempt 1; " \
            f"last committed step {row['last_commit_step']}"
    assert text.count(final) == 1 and text.count("stopped by SIGINT") == 1, text[-3000:]
    assert "Traceback" not in text
    # Nothing glued: each of trainguard's lines starts a line, after a newline or an erase.
    for start in ("trainguard: job", f"job {job_id} stopped"):
        at = text.index(start)
        while at != -1:
            assert at == 0 or text[:at].endswith(("\n", "\x1b[2K")), repr(text[at - 80:at + 40])
            at = text.find(start, at + 1)
    # The Run saved on the way out, and the table says so.
    latest = committed_on_signal(run_dir, text)
    assert row["status"] == "stopped" and latest.step == row["last_commit_step"]
    assert row["speed"] is None
    assert [a.exit_code for a in JobTable().attempts(job_id)] == [75]


def test_closing_the_terminal_stops_the_job_with_a_commit_and_exits_129(home, tmp_path):
    run_dir = tmp_path / "run"
    code, _ = run_on_a_terminal(["run", LOUD, "--run-dir", str(run_dir), "--no-preflight",
                                 "--", "--sleep", "0.05"],
                                lambda text: text.count("loss=") >= 3, hang_up=True)
    row = JobTable().get(JobTable().all()[0]["id"])
    assert code == 129  # 128 + SIGHUP
    assert row["status"] == "stopped", row["message"]  # not lost, not failed
    assert "stopped by SIGHUP (its terminal closed)" in row["message"]
    log = (home / "jobs" / row["id"] / "attempt-1.log").read_text()
    assert committed_on_signal(run_dir, log).step == row["last_commit_step"]
    assert [a.exit_code for a in JobTable().attempts(row["id"])] == [75]


# -- pipes --------------------------------------------------------------------------------

def test_sigterm_to_a_foreground_run_stops_the_job_and_exits_143(home, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "trainguard", "run",
                             script(tmp_path, "sleeper.py"), "--no-preflight", "--run-dir",
                             tmp_path / "run"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job_id = wait_for(lambda: [j["id"] for j in JobTable().all() if j["child_pid"]],
                          what="the attempt to start")[0]
        proc.terminate()  # SIGTERM, as `kill` or a batch system sends it
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert out == f"job {job_id} stopped: stopped by SIGTERM after attempt 1\n", out + err
    assert "Traceback" not in err and JobTable().get(job_id)["status"] == "stopped"


def test_without_a_terminal_the_output_streams_with_one_line_per_attempt(home, tmp_path):
    flaky = script(tmp_path, "flaky.py")
    result = tg("run", flaky, "--no-preflight", "--retries", 2, "--retry-delay", 0,
                "--run-dir", tmp_path / "run", "--", tmp_path / "count")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = final_line(result).split()[1]
    err = result.stderr
    assert "\x1b" not in err + result.stdout  # no terminal: no redraws
    lines = err.splitlines()
    start = f"trainguard: job {job_id}: attempt "
    started = [i for i, line in enumerate(lines) if line.startswith(start) and "running" in line]
    assert len(started) == 2, err  # one line per attempt start...
    retry = lines.index(f"trainguard: job {job_id}: attempt 1 exited with code 1 (RuntimeError: "
                        f"injected failure on attempt 1); retry 1/2 in 0 s")  # ...and end
    hello1, hello2 = lines.index("attempt 1 says hello"), lines.index("attempt 2 says hello")
    assert started[0] < hello1 < lines.index("attempt 1 to stderr") < retry < started[1] < hello2
    assert lines[started[1]].startswith(f"trainguard: job {job_id}: attempt 2 running (retry 1/2)")
    assert "RuntimeError: injected failure on attempt 1" in lines  # the traceback, streamed
    assert len([line for line in lines if line.startswith("trainguard:")]) == 3  # no spam
    assert "attempt 1 says hello" in tg("logs", job_id, "--attempt", 1).stdout  # logs still work


def test_an_import_error_fails_at_once_and_names_the_error(home, tmp_path):
    result = tg("run", script(tmp_path, "missing_import.py"), "--no-preflight", "--retries", 3,
                "--retry-delay", 0, "--run-dir", tmp_path / "run")
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = final_line(result).split()[1]
    error = "ModuleNotFoundError: No module named 'no_such_module_for_trainguard_tests'"
    assert final_line(result) == (f"job {job_id} failed: attempt 1 failed before training "
                                  f"started: {error}; not retried (a retry cannot fix it)")
    assert error in result.stderr.splitlines() and "starting" in result.stderr  # streamed
    job = status_json(job_id)
    assert job["status"] == "failed" and len(job["attempts"]) == 1


def test_a_failure_after_training_started_is_still_retried(home, tmp_path):
    # A RuntimeError in the middle of a Run's loop: the next attempt resumes from the commit.
    result = tg("run", "tests/integration/launch_scripts/job.py", "--run-dir", tmp_path / "run",
                "--no-preflight", "--retries", 1, "--retry-delay", 0, "--", "--steps", 14,
                "--crash-attempts", 1, "--crash-at", 12)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = final_line(result).split()[1]
    assert [a["exit_code"] for a in status_json(job_id)["attempts"]] == [1, 0]
    assert "RuntimeError: injected crash at step 12 on attempt 1); retry 1/1 in 0 s" \
        in result.stderr


# -- honest status ------------------------------------------------------------------------

def test_status_names_the_running_attempt_not_the_last_retry_wait(home, tmp_path):
    release = tmp_path / "release"
    started = tg("run", "--detach", script(tmp_path, "flaky.py"), "--no-preflight",
                 "--retry-delay", 0, "--run-dir", tmp_path / "run", "--",
                 tmp_path / "count", release)
    job_id = started.stdout.strip()
    wait_for(lambda: (tmp_path / "count").exists() and (tmp_path / "count").read_text() == "2",
             what="attempt 2 to start")
    wait_for(lambda: JobTable().get(job_id)["attempt"] == 2, what="the table to see attempt 2")
    running = status_json(job_id)
    release.touch()
    assert running["status"] == "running" and running["message"] == "attempt 2 running (retry 1/3)"
    wait_for(lambda: JobTable().get(job_id)["status"] == "succeeded", what="the job to end")


def test_an_ended_job_shows_no_speed(home, tmp_path):
    job_id = tg("run", "--detach", script(tmp_path, "beating.py"), "--no-preflight",
                "--run-dir", tmp_path / "run", "--stop-grace", "10s").stdout.strip()
    wait_for(lambda: JobTable().get(job_id)["speed"], what="a measured speed")
    assert tg("stop", job_id).returncode == 0
    job = status_json(job_id)
    assert job["status"] == "stopped" and job["speed"] is None and job["step"] > 0
    assert job["message"].startswith("stopped on request after attempt 1")
    assert job["attempts"][0]["reason"] == "stopped; killed by SIGTERM"  # no Run: no handler


def test_a_kill_by_signal_is_recorded_by_its_name(home, tmp_path):
    result = tg("run", script(tmp_path, "killed.py"), "--no-preflight", "--retries", 0,
                "--run-dir", tmp_path / "run")
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = final_line(result).split()[1]
    assert final_line(result) == f"job {job_id} failed: attempt 1 was killed by SIGKILL; " \
                                 f"0 retries used"
    attempt = status_json(job_id)["attempts"][0]
    assert (attempt["exit_code"], attempt["reason"]) == (-9, "killed by SIGKILL")


def test_success_without_a_run_says_nothing_was_checkpointed(home, tmp_path):
    run_dir = tmp_path / "run"
    result = tg("run", script(tmp_path, "ok.py"), "--no-preflight", "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = final_line(result).split()[1]
    message = (f"attempt 1 exited 0 without opening a trainguard Run in {run_dir}: "
               f"nothing was checkpointed")
    assert final_line(result) == f"job {job_id} succeeded: {message}"
    job = status_json(job_id)
    assert (job["status"], job["message"]) == ("succeeded", message)


# -- run dirs that cannot be, and the supervisor's own errors -----------------------------

@pytest.mark.parametrize("detach", [False, True])
def test_a_run_dir_under_a_file_fails_before_launching(home, tmp_path, detach):
    (tmp_path / "afile").write_text("not a directory")
    result = tg("run", *(["--detach"] if detach else []), script(tmp_path, "ok.py"),
                "--run-dir", tmp_path / "afile" / "run")
    assert result.returncode == RunDirError.exit_code, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"trainguard: error: run dir {tmp_path / 'afile' / 'run'} cannot be made: "
        f"{tmp_path / 'afile'} is a file, not a directory; choose a run dir (--run-dir) "
        f"that is a directory or can be made as one"]
    assert result.stdout == "" and JobTable().all() == []  # nothing launched, nothing lost


def supervise_in_a_thread(supervisor: Supervisor) -> str:
    """``supervisor.run()`` off the main thread: it installs no signal handlers in pytest."""
    result = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()))
    thread.start()
    thread.join(timeout=300)
    assert result, "the supervisor did not return"
    return result[0]


def test_an_unreadable_run_dir_does_not_break_the_supervisor(home, tmp_path):
    # Past launch()'s check (the file appeared later): reading the heartbeat under a file
    # raises NotADirectoryError, which once ended the supervisor and left the job lost.
    (tmp_path / "afile").write_text("x")
    table = JobTable()
    job_id = table.create(JobSpec(str(script(tmp_path, "ok.py")),
                                  run_dir=str(tmp_path / "afile" / "run"), retry=RetryPolicy(0)))
    assert supervise_in_a_thread(Supervisor(table, job_id, poll=0.05)) == "succeeded"


def test_an_error_in_the_supervisor_fails_the_job_and_stops_its_attempt(home, tmp_path):
    table = JobTable()
    job_id = table.create(JobSpec(str(script(tmp_path, "sleeper.py")), run_dir=str(tmp_path / "r"),
                                  stop_grace=10))
    pids = []

    class Broken(Supervisor):
        def _refresh(self, pid, started_wall, force=False):
            pids.append(pid)
            if "up" in (self.table.job_dir(self.job_id) / "attempt-1.log").read_text():
                raise RuntimeError("injected supervisor bug")
            return super()._refresh(pid, started_wall, force)

    assert supervise_in_a_thread(Broken(table, job_id, poll=0.05)) == "failed"
    row = table.get(job_id)
    assert row["message"] == ("the supervisor failed (RuntimeError: injected supervisor bug); "
                              "the attempt it watched was stopped")
    assert row["child_pid"] is None
    with pytest.raises(ProcessLookupError):
        os.kill(pids[-1], 0)  # stopped and reaped, not left running unsupervised
