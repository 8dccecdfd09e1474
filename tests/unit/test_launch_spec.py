"""Job specs, durations, retry delays and the job table (no processes)."""

from __future__ import annotations

import pytest

from trainguard.launch import JobSpec, JobTable, RetryPolicy, format_duration, parse_duration
from trainguard.launch.jobs import JobNotFound


@pytest.mark.parametrize("text, seconds", [("90", 90), ("45s", 45), ("30m", 1800),
                                           ("12h", 43200), ("1h30m", 5400), ("2d", 172800),
                                           ("0.5h", 1800), (7, 7)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "12x", "h", "-5", "1h x", "inf"])
def test_unparsable_durations_name_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_format_duration():
    assert [format_duration(s) for s in (5, 125, 5400, 90000, None)] == \
        ["5s", "2m05s", "1h30m", "1d01h", "-"]


def test_retry_delays_back_off_up_to_the_cap():
    policy = RetryPolicy(retries=5, delay=10, backoff=3, max_delay=100)
    assert [policy.delay_before_retry(i) for i in (1, 2, 3, 4)] == [10, 30, 90, 100]


@pytest.mark.parametrize("kwargs", [{"retries": -1}, {"delay": -1}, {"backoff": 0.5},
                                    {"max_resumes": 1.5}])
def test_bad_retry_policies(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_spec_resolves_paths_and_round_trips(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    spec = JobSpec("train.py", ("--lr", "0.1"), cwd=str(tmp_path), timeout=60.0,
                   retry=RetryPolicy(2, 1.0))
    assert spec.script == str(script) and spec.run_dir == str(tmp_path / "runs" / "train")
    assert spec.name == "train" and spec.command[-2:] == ["--lr", "0.1"]
    assert JobSpec.from_json(spec.to_json()) == spec


def test_spec_refuses_missing_script_and_bad_limits(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
        JobSpec("nope.py", cwd=str(tmp_path))
    (tmp_path / "t.py").write_text("")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        JobSpec("t.py", cwd=str(tmp_path), timeout=0)
    with pytest.raises(ValueError, match="budget_usd needs gpu_hourly_usd"):
        JobSpec("t.py", cwd=str(tmp_path), budget_usd=5)


def test_job_table_records_jobs_and_attempts(tmp_path):
    (tmp_path / "t.py").write_text("")
    table = JobTable(tmp_path / "home")
    job_id = table.create(JobSpec("t.py", cwd=str(tmp_path)))
    assert table.resolve(job_id[:3]) == job_id
    table.start_attempt(job_id, 1)
    table.end_attempt(job_id, 1, 3, "exited")
    table.update(job_id, status="retrying", attempt=1)
    other = JobTable(tmp_path / "home")  # a second connection (another process) sees it
    assert other.get(job_id)["status"] == "retrying"
    assert [(a.n, a.exit_code, a.reason) for a in other.attempts(job_id)] == [(1, 3, "exited")]
    with pytest.raises(JobNotFound, match="no job 'zzz'"):
        other.resolve("zzz")


def test_torchrun_waits_the_jobs_stop_grace_before_killing_saving_workers(monkeypatch,
                                                                          tmp_path):
    """torchrun SIGKILLs its workers 30 s after passing on a signal unless told otherwise;
    a torchrun attempt's environment carries the job's grace, and torch reads it."""
    from torch.distributed.launcher.api import LaunchConfig

    from trainguard.launch.torchrun import ENV_SHUTDOWN_TIMEOUT, torchrun_env

    env = torchrun_env(300.0)
    assert env[ENV_SHUTDOWN_TIMEOUT] == "300"
    assert torchrun_env(5)[ENV_SHUTDOWN_TIMEOUT] == "30"  # never below torch's default
    monkeypatch.setenv(ENV_SHUTDOWN_TIMEOUT, env[ENV_SHUTDOWN_TIMEOUT])
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2)
    assert config.shutdown_timeout == 300
    from trainguard.launch.supervisor import Supervisor

    script = tmp_path / "train.py"
    script.write_text("")
    table = JobTable(tmp_path / "home")
    job = table.create(JobSpec(script=str(script), run_dir=str(tmp_path / "run"),
                               stop_grace=240, torchrun={"nproc_per_node": 2}))
    child_env = Supervisor(table, job)._child_env(tmp_path / "exits")
    assert child_env[ENV_SHUTDOWN_TIMEOUT] == "240"
