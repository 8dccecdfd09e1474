"""What each command imports, read from a real process's ``python -X importtime``.

The job commands a person types all day (``--help``, ``ps``, ``status``, ``logs``,
``stop``, the launcher side of ``run``) and ``import trainguard`` itself load neither torch
nor numpy nor safetensors nor modal: those cost seconds before the first line of output.
A training worker of one process loads torch but not ``torch.distributed.checkpoint``,
which only sharded saves need. Behaviour, not speed, is asserted: no timings here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from trainguard.errors import JobNotFound
from trainguard.launch.jobs import FINAL, JobTable

#: Top-level packages the torch-free paths must not import.
HEAVY = ("torch", "numpy", "safetensors", "modal", "modal_proto", "obstore")


def imports(*argv: str, env: dict, cwd=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGV``; its result and every module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)
    return proc, imported(proc.stderr)


def imported(stderr: str) -> set[str]:
    """The modules named by ``-X importtime`` lines (``import time: SELF | CUMUL | NAME``)."""
    modules = set()
    for line in stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[0].strip().isdigit():
            modules.add(fields[2].strip())
    return modules


def heavy(modules: set[str], roots=HEAVY) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in roots)


def cli(*argv: str, env: dict, cwd=None) -> subprocess.CompletedProcess:
    """``trainguard ARGV`` as a user runs it; fails the test if it imported a heavy module."""
    proc, modules = imports("-m", "trainguard", *argv, env=env, cwd=cwd)
    assert "trainguard.cli" in modules, proc.stderr[-2000:]  # the parse saw the imports
    assert heavy(modules) == [], (argv, heavy(modules)[:10])
    return proc


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "TRAINGUARD_HOME": str(home)}


WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from trainguard import Run

    run_dir = os.environ["TRAINGUARD_RUN_DIR"]
    model = torch.nn.Linear(4, 4)
    for _ in range(2):  # the second Run resumes what the first committed
        with Run(run_dir, save_every_steps=1, tensorboard=False) as run:
            start = run.track(model=model)
            for step in run.steps(start + 2):
                run.log(loss=model(torch.ones(4)).sum().item())
    dcp = sorted(m for m in sys.modules if m.startswith("torch.distributed.checkpoint"))
    print(f"resumed after step {start}; dcp modules: {dcp}", flush=True)
""")


def wait_final(home: str, job_id: str, seconds: float = 180) -> dict:
    table = JobTable(home)
    deadline = time.monotonic() + seconds
    while (job := table.get(job_id))["status"] not in FINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_job_commands_and_a_one_process_worker_skip_the_heavy_imports(tmp_path, env):
    (tmp_path / "worker.py").write_text(WORKER)
    help_ = cli("--help", env=env)
    assert help_.returncode == 0 and "ps" in help_.stdout and "verify" in help_.stdout
    assert "--detach" in cli("run", "--help", env=env).stdout
    for command in ("sync", "preflight"):
        assert cli(command, "--help", env=env).returncode == 0
    missing = cli("status", "nosuchjob", env=env)
    assert missing.returncode == JobNotFound.exit_code and "trainguard: error:" in missing.stderr

    launched = cli("run", "--detach", "worker.py", "--run-dir", str(tmp_path / "run"),
                   "--retries", "0", env=env, cwd=tmp_path)  # preflight included
    assert launched.returncode == 0, launched.stderr[-2000:]
    job_id = launched.stdout.split()[0]
    job = wait_final(env["TRAINGUARD_HOME"], job_id)
    assert job["status"] == "succeeded", job

    assert job_id in cli("ps", env=env).stdout
    assert "succeeded" in cli("status", job_id, env=env).stdout
    logs = cli("logs", job_id, env=env).stdout
    assert "resumed after step 2; dcp modules: []" in logs, logs
    assert "already succeeded" in cli("stop", job_id, env=env).stdout


def test_a_modal_dry_run_plans_without_modal_or_torch(tmp_path, env):
    (tmp_path / "train.py").write_text("print('hi')\n")
    plan = cli("run", "--backend", "modal", "--volume", "vol", "--dry-run", "train.py",
               env=env, cwd=tmp_path)
    assert plan.returncode == 0 and "vol" in plan.stdout, plan.stderr[-2000:]


def test_import_trainguard_is_cheap_and_names_load_on_use(env):
    proc, modules = imports("-c", "import trainguard; print(len(dir(trainguard)))", env=env)
    assert proc.returncode == 0 and "trainguard" in modules, proc.stderr[-2000:]
    assert heavy(modules) == []
    proc, modules = imports("-c", "from trainguard import Run, keep_last", env=env)
    assert proc.returncode == 0 and "torch" in modules, proc.stderr[-2000:]
    assert "torch.distributed.checkpoint" not in modules


def test_the_local_modal_control_plane_starts_without_torch(tmp_path, env):
    # stderr (the import log) goes to a file: a full pipe would block the plane mid-import
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m",
                                 "trainguard.testing.modal_local"], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        try:
            first = proc.stdout.readline()  # printed once the plane serves (or "" if it died)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        err.seek(0)
        modules = imported(err.read())
    assert first.startswith("MODAL_SERVER_URL="), first
    assert "trainguard.testing.modal_local.servicer" in modules
    assert heavy(modules, ("torch", "numpy", "safetensors")) == []


SUPERVISE = textwrap.dedent("""
    import subprocess, sys
    from trainguard.launch import JobSpec, JobTable, RetryPolicy, Supervisor

    spawned = subprocess.Popen
    def popen(*args, **kwargs):  # what the supervisor has loaded when an attempt starts
        print("checkpoint layer loaded:", "trainguard.checkpoint.manager" in sys.modules)
        return spawned(*args, **kwargs)
    subprocess.Popen = popen
    table = JobTable(sys.argv[1])
    job_id = table.create(JobSpec(sys.argv[2], (), run_dir=sys.argv[3], retry=RetryPolicy(0)))
    print("status:", Supervisor(table, job_id, poll=0.05).run())
""")


def test_the_supervisor_loads_the_checkpoint_layer_before_an_attempt_starts(tmp_path, env):
    # Loaded at its first look for a commit instead, it would compete with the attempt's
    # start-up and stall the hang clock for seconds.
    (tmp_path / "ok.py").write_text("print('ok')\n")
    (tmp_path / "supervise.py").write_text(SUPERVISE)
    proc = subprocess.run([sys.executable, str(tmp_path / "supervise.py"), env["TRAINGUARD_HOME"],
                           str(tmp_path / "ok.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.splitlines() == ["checkpoint layer loaded: True", "status: succeeded"], \
        proc.stdout + proc.stderr[-2000:]
