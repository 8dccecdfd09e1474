"""The Modal backend, offline: real modal objects built from a JobSpec, limits, the seam."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from modal._utils.async_utils import synchronizer
from modal.mount import _Mount

from trainguard.cli import cli
from trainguard.errors import (
    AttemptFailed,
    AttemptPreempted,
    JobBusy,
    ModalLaunchFailed,
    PreflightFailed,
    RunDirBusy,
)
from trainguard.launch import JobSpec, JobTable, RetryPolicy
from trainguard.launch.modal_backend import (
    ModalConfigError,
    ModalOptions,
    build_app,
    build_plan,
    validate_gpu,
    validate_retries,
    validate_timeout,
)
from trainguard.launch.modal_entry import run_job

FIXTURE = Path(__file__).parent.parent / "fixtures" / "modal_project"


@pytest.fixture
def project(tmp_path):
    """The sample project, plus a virtualenv inside it whose packages must never ship."""
    root = tmp_path / "proj"
    shutil.copytree(FIXTURE, root)
    site = root / ".venv" / "lib" / "python3.11" / "site-packages" / "fakepkg"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("X = 1\n")
    (root / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    with open(root / "train.py", "a") as handle:
        handle.write("\ntry:\n    import fakepkg  # installed, not local\nexcept ImportError:\n"
                     "    pass\n")
    return root


def _image_files(function) -> dict[str, str]:
    """Every (local -> container) file the real modal.Image ships, read offline."""
    image = synchronizer._translate_in(function)._spec.image
    seen, files, todo = set(), {}, [image]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Mount):
            for entry in obj.entries:
                files.update({str(local): str(remote)
                              for local, remote in entry.get_files_to_upload()})
        todo.extend(obj._deps_())
    return files


def _spec(project, **kw) -> JobSpec:
    return JobSpec("train.py", cwd=str(project), retry=RetryPolicy(5, 30, 2, 60),
                   timeout=12 * 3600, **kw)


def test_image_ships_every_nested_local_package_and_nothing_installed(project):
    requirements = str(project / "requirements.txt")
    plan = build_plan(_spec(project), ModalOptions(volume="runs", gpu="H100:8",
                                                   requirements_file=requirements))
    assert set(plan.local_modules) == {"helpers", "mypkg", "utils_local"}
    expected = {"train.py", "utils_local.py", "helpers/__init__.py", "helpers/tools.py",
                "mypkg/__init__.py", "mypkg/models/__init__.py", "mypkg/models/net.py",
                "mypkg/models/layers.py", "mypkg/data/__init__.py", "mypkg/data/loader.py"}
    assert {remote.removeprefix("/root/") for remote in plan.files.values()} == expected
    assert "fakepkg" in plan.third_party and "numpy" in plan.third_party

    app, function = build_app(plan)
    shipped = _image_files(function)
    project_files = {k: v for k, v in shipped.items() if not v.startswith("/root/trainguard/")}
    assert project_files == plan.files  # the plan says exactly what the image ships
    assert not any("site-packages" in p or ".venv" in p for p in shipped)
    assert all(not p.endswith(".pyc") for p in shipped)
    spec = synchronizer._translate_in(function)._spec
    assert spec.gpus == "H100:8" and list(spec.volumes) == ["/trainguard"]
    assert plan.packages[:2] == ["numpy==1.26.4", "torch==2.2.2"]


def test_dry_run_prints_the_plan_without_contacting_modal(project, monkeypatch):
    monkeypatch.chdir(project)
    args = ["run", "train.py", "--backend", "modal", "--gpu", "H100:8,A100-80GB:8", "--timeout",
            "12h", "--retries", "5", "--retry-delay", "30", "--volume", "runs", "--dry-run"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "nothing from site-packages" in text.output
    assert "-> /root/mypkg/models/net.py" in text.output and "fakepkg" not in text.output
    out = CliRunner().invoke(cli, [*args, "--json"])
    plan = json.loads(out.output)
    assert plan["gpu"] == ["H100:8", "A100-80GB:8"] and plan["timeout"] == 43200
    assert plan["retries"] == {"max_retries": 5, "initial_delay": 30.0,
                               "backoff_coefficient": 2.0, "max_delay": 60.0}
    assert plan["volume"] == "runs" and plan["mount_path"] == "/trainguard"
    assert "/root/mypkg/data/loader.py" in plan["files"].values()


def test_env_values_and_secrets_never_show_in_the_plan_nor_the_job(project, monkeypatch):
    monkeypatch.chdir(project)
    (project / "vocab.txt").write_text("a\nb\n")
    args = ["run", "train.py", "--backend", "modal", "--volume", "runs", "--dry-run",
            "--env", "WANDB_API_KEY=sekrit-123", "--secret", "hf-token", "--add-local",
            "vocab.txt", "--add-local", "helpers:assets/helpers"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "sekrit-123" not in text.output and "WANDB_API_KEY=***" in text.output
    assert "secrets   hf-token" in text.output and "single_use_containers" in text.output
    plan = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert "sekrit-123" not in json.dumps(plan)
    assert plan["env"] == {"WANDB_API_KEY": "***"} and plan["job"]["env"] == {}
    assert plan["files"][str(project / "vocab.txt")] == "/root/vocab.txt"
    assert plan["files"][str(project / "helpers" / "tools.py")] == "/root/assets/helpers/tools.py"
    bad = CliRunner().invoke(cli, [*args[:6], "--add-local", "nothere.csv"])
    assert bad.exit_code == 2 and "nothere.csv" in bad.output and "does not exist" in bad.output


def test_a_refused_launch_is_one_line_and_the_job_is_recorded_failed(project, tmp_path,
                                                                      monkeypatch):
    from trainguard.launch import modal_jobs

    class Refusing:
        def start(self, app, function, job, *, detach, started):
            raise ConnectionRefusedError("cannot reach api.modal.com")

    monkeypatch.setattr(modal_jobs, "CLIENT_FACTORY", Refusing)
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(project)
    out = CliRunner().invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "runs",
                                   "--detach", "--no-preflight"])
    assert out.exit_code == ModalLaunchFailed.exit_code and "Traceback" not in out.output
    assert "modal launch failed: ConnectionRefusedError: cannot reach" in out.output
    (job,) = JobTable().all()
    assert job["status"] == "failed" and "cannot reach" in job["message"]


@pytest.mark.parametrize("args, limit", [
    (["--timeout", "25h"], "10s to 24h"), (["--timeout", "5s"], "10s to 24h"),
    (["--retries", "11"], "0 to 10 retries"), (["--retry-delay", "90"], "0 to 60 s"),
    (["--backoff", "20"], "between 1 and 10"), (["--max-delay", "2m"], "1 to 60 s"),
    (["--gpu", "H100:9"], "1 to 8 H100"), (["--gpu", "A10:5"], "1 to 4 A10"),
    (["--gpu", "V100"], "unknown Modal GPU type"), (["--gpu", "H100:x"], "not a whole number"),
])
def test_out_of_limit_options_are_refused_with_the_limit(project, monkeypatch, args, limit):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "v",
                                      "--dry-run", *args])
    assert result.exit_code == 2 and limit in result.output, result.output
    assert "Traceback" not in result.output


def test_validators_accept_modal_forms():
    assert validate_gpu("h100") == "H100"
    assert validate_gpu("H100:8, a100-80gb:8") == ["H100:8", "A100-80GB:8"]
    assert validate_timeout(None) == 86400 and validate_timeout(10) == 10
    assert validate_retries(10, 0, 10, 60)["max_retries"] == 10
    with pytest.raises(ModalConfigError, match="24h"):
        validate_timeout(86401)
    with pytest.raises(ModalConfigError, match="volume name"):
        ModalOptions(volume="bad name!")


class FakeVolume:
    def __init__(self) -> None:
        self.commits = 0
        self.events: list[str] = []

    def commit(self) -> None:
        self.commits += 1
        self.events.append("commit")

    def reload(self) -> None:
        self.events.append("reload")


def _job(tmp_path, body: str) -> dict:
    script = tmp_path / "job.py"
    script.write_text(body)
    return {"script": str(script), "args": ["--x", "1"], "run_dir": str(tmp_path / "vol/run"),
            "volume": "v", "mount_path": str(tmp_path / "vol"), "timeout": 0, "env": {}}


def test_remote_entry_maps_exit_codes_and_always_commits(tmp_path):
    volume = FakeVolume()
    ok = _job(tmp_path, "import os, sys\nassert sys.argv[1:] == ['--x', '1']\n"
                        "from trainguard.store import open_store\n"
                        "print(type(open_store(os.environ['TRAINGUARD_RUN_DIR'])).__name__)\n")
    assert run_job(ok, volume=volume)["exit_code"] == 0 and volume.commits == 1
    with pytest.raises(AttemptPreempted):
        run_job(_job(tmp_path, "raise SystemExit(75)\n"), volume=volume)
    with pytest.raises(AttemptFailed, match="code 3"):
        run_job(_job(tmp_path, "raise SystemExit(3)\n"), volume=volume)
    with pytest.raises(ZeroDivisionError):
        run_job(_job(tmp_path, "1 / 0\n"), volume=volume)
    assert volume.commits == 4  # committed on every way out, errors included


_CANCELLED_LOOP = """
import os, signal, torch
from trainguard import Run
model = torch.nn.Linear(2, 1)
with Run(save_every_steps=1000, tensorboard=False) as run:
    run.track(model=model)
    for step in run.steps(50):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # FunctionCall.cancel(), as Modal sends it
        print("STEP", step, flush=True)
"""


def test_a_cancellation_is_a_graceful_stop_and_ends_the_input_as_cancelled(tmp_path, capsys):
    """Modal delivers cancel() as SIGUSR1, which its runtime turns into InputCancellation
    raised mid-step; the entry saves and commits first, then ends the input cancelled."""
    from modal.exception import InputCancellation

    from trainguard import CheckpointManager

    volume = FakeVolume()
    job = _job(tmp_path, _CANCELLED_LOOP)
    with pytest.raises(InputCancellation, match="committed first"):
        run_job(job, volume=volume)
    assert "STEP 3" in capsys.readouterr().out
    assert [c.step for c in CheckpointManager(job["run_dir"]).list()] == [3]
    assert volume.events[0] == "reload"  # a retry's stale view is refreshed before resuming
    assert volume.events[-1] == "commit"


def test_before_modal_times_out_the_attempt_saves_commits_and_asks_to_be_run_again(tmp_path):
    """Modal kills an attempt at its timeout; the entry interrupts the Run a margin
    before (a quarter of a short timeout), so the attempt ends committed."""
    from trainguard import CheckpointManager
    from trainguard.launch.modal_entry import timeout_margin

    assert timeout_margin(12 * 3600) == 120 and timeout_margin(4) == 1
    job = _job(tmp_path, "import time, torch\nfrom trainguard import Run\n"
                         "model = torch.nn.Linear(2, 1)\n"
                         "with Run(save_every_steps=10**9, tensorboard=False) as run:\n"
                         "    run.track(model=model)\n"
                         "    for step in run.steps(10**9):\n        time.sleep(0.01)\n")
    job["timeout"] = 4
    with pytest.raises(AttemptPreempted):
        run_job(job, volume=FakeVolume())
    (saved,) = CheckpointManager(job["run_dir"]).list()
    assert saved.step > 0


def test_remote_entry_gives_the_script_a_volume_store(tmp_path, capsys):
    job = _job(tmp_path, "import os\nfrom trainguard.store import open_store\n"
                         "print(type(open_store(os.environ['TRAINGUARD_RUN_DIR'])).__name__)\n")
    run_job(job, volume=FakeVolume())
    assert "ModalVolumeStore" in capsys.readouterr().out


class FakeClient:
    """A fake of the ModalClient seam."""

    def __init__(self) -> None:
        self.calls: list = []
        self.state = ("running", "")

    def start(self, app, function, job, *, detach, started):
        self.calls.append(("start", app.name, detach, job["run_dir"]))
        started("ap-123", "fc-456")
        return "ap-123", "fc-456"

    def poll(self, call_id):
        self.calls.append(("poll", call_id))
        return self.state

    def logs(self, call_id, *, follow, tail, since=None):
        self.calls.append(("logs", call_id, follow))
        yield f"logs of {call_id}\n"

    def cancel(self, call_id, *, terminate=False):
        self.calls.append(("cancel", call_id))
        self.state = ("failed", "RemoteError: cancelled")

    def stop_app(self, app_id):
        self.calls.append(("stop_app", app_id))

    def last_commit(self, run_url):
        return 40


def test_detached_modal_jobs_are_tracked_through_the_seam(project, tmp_path, monkeypatch):
    from trainguard.launch import modal_jobs
    from trainguard.launch.modal_jobs import modal_call

    fake = FakeClient()
    monkeypatch.setattr(modal_jobs, "CLIENT_FACTORY", lambda: fake)
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    monkeypatch.chdir(project)
    runner = CliRunner()
    out = runner.invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "runs",
                              "--requirements", "requirements.txt", "--detach"])
    assert out.exit_code == 0, out.output
    job_id = [line for line in out.output.splitlines() if len(line) == 8][-1]
    assert fake.calls[0] == ("start", "trainguard-train", True, "/trainguard/train")
    table = JobTable()
    assert modal_call(table, job_id)["call_id"] == "fc-456"
    assert table.get(job_id)["backend"] == "modal"
    ps = runner.invoke(cli, ["ps", "--json"])
    assert json.loads(ps.output)[0]["status"] == "running" and ("poll", "fc-456") in fake.calls
    assert "logs of fc-456" in runner.invoke(cli, ["logs", job_id]).output
    stop = runner.invoke(cli, ["stop", job_id])
    assert stop.exit_code == 0 and ("cancel", "fc-456") in fake.calls
    assert table.get(job_id)["status"] == "stopped"  # the cancelled call's failure, read
    assert ("stop_app", "ap-123") in fake.calls      # as the stop it was; app stopped


def test_modal_launch_is_refused_before_start_when_preflight_fails(project, tmp_path, monkeypatch):
    from trainguard.launch import modal_jobs

    fake = FakeClient()
    monkeypatch.setattr(modal_jobs, "CLIENT_FACTORY", lambda: fake)
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "none.toml"))
    monkeypatch.chdir(project)
    out = CliRunner().invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "runs",
                                   "--detach"])
    assert out.exit_code == PreflightFailed.exit_code and "modal token new" in out.output
    assert fake.calls == []


def test_a_modal_job_holds_its_run_dir_and_resumes_with_its_recorded_options(project, tmp_path,
                                                                            monkeypatch):
    from trainguard.launch import modal_jobs

    fake = FakeClient()
    monkeypatch.setattr(modal_jobs, "CLIENT_FACTORY", lambda: fake)
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(project)
    runner = CliRunner()
    launch = ["run", "train.py", "--backend", "modal", "--volume", "runs", "--gpu", "A10G",
              "--requirements", "requirements.txt", "--no-preflight", "--detach"]
    job_id = runner.invoke(cli, launch).output.splitlines()[0]
    second = runner.invoke(cli, launch)
    assert second.exit_code == RunDirBusy.exit_code
    assert f"job {job_id} already runs on modal://runs/train" in second.output
    still_running = runner.invoke(cli, ["resume", job_id])
    assert still_running.exit_code == JobBusy.exit_code, still_running.output
    assert runner.invoke(cli, ["stop", job_id]).exit_code == 0
    fake.state = ("running", "")
    resumed = runner.invoke(cli, ["resume", job_id, "--detach"])
    assert resumed.exit_code == 0, resumed.output
    starts = [c for c in fake.calls if c[0] == "start"]
    assert len(starts) == 2 and starts[1] == starts[0]  # the same app, the same run dir
    row = JobTable().get(job_id)
    options = modal_jobs.recorded_options(modal_jobs.modal_call(JobTable(), job_id))
    assert row["status"] == "running" and options.gpu == "A10G"
    assert options.packages == tuple(dict.fromkeys(options.packages))  # not read twice
    assert options.requirements_file is None  # its lines are in packages: no path to find
    assert len(JobTable().all()) == 1  # the same job, not a new one

    runner.invoke(cli, ["stop", job_id])
    removed = runner.invoke(cli, ["rm", job_id])
    assert removed.exit_code == 0 and modal_jobs.modal_call(JobTable(), job_id) is None

    with_env = runner.invoke(cli, [*launch, "--env", "WANDB_API_KEY=abc"])
    env_job = with_env.output.splitlines()[0]
    runner.invoke(cli, ["stop", env_job])
    refused = runner.invoke(cli, ["resume", env_job])
    assert refused.exit_code == 1 and "--env WANDB_API_KEY" in refused.output
    assert "abc" not in refused.output


def test_the_modal_commit_column_skips_saves_a_resume_would_skip():
    from trainguard.launch.modal_jobs import _resumable_manifest

    assert _resumable_manifest(b'{"step": 3, "tags": {"reason": "periodic"}}')
    assert not _resumable_manifest(b'{"step": 7, "tags": {"resumable": "false"}}')
    assert not _resumable_manifest(b"[1]") and not _resumable_manifest(b"{torn")


def test_a_resume_that_modal_refuses_can_be_resumed_again(project, tmp_path, monkeypatch):
    from trainguard.launch import modal_jobs

    fake = FakeClient()
    monkeypatch.setattr(modal_jobs, "CLIENT_FACTORY", lambda: fake)
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(project)
    runner = CliRunner()
    job_id = runner.invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "runs",
                                 "--requirements", "requirements.txt", "--no-preflight",
                                 "--detach"]).output.splitlines()[0]
    assert runner.invoke(cli, ["stop", job_id]).exit_code == 0
    monkeypatch.chdir(tmp_path)  # the verbs work from anywhere (the options hold no path)
    real_start = fake.start

    def unreachable(*args, **kwargs):
        raise ConnectionError("modal is down")
    fake.start = unreachable
    refused = runner.invoke(cli, ["resume", job_id, "--detach"])
    assert refused.exit_code == ModalLaunchFailed.exit_code and "modal is down" in refused.output
    assert JobTable().get(job_id)["status"] == "failed"  # not pending forever
    fake.start, fake.state = real_start, ("running", "")
    again = runner.invoke(cli, ["resume", job_id, "--detach"])
    assert again.exit_code == 0, again.output
    assert JobTable().get(job_id)["status"] == "running"
    assert runner.invoke(cli, ["logs", job_id]).exit_code == 0
