"""The Modal path end to end, against trainguard's local Modal control plane.

The real ``modal`` client (launcher side and container runtime) speaks gRPC to
``trainguard.testing.modal_local``; every container is a subprocess in a fresh directory.
Each test follows a user's journey through the CLI, from separate processes, and then
asserts what the plane received (files, image, GPU, timeout, retries, secrets) and what
the volume holds. Waits are derived from what the plane and the volume show.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.testing.modal_local import LocalModal

ROOT = Path(__file__).resolve().parents[2]
PROJECT = Path(__file__).parent / "modal_project"


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    with LocalModal(tmp_path_factory.mktemp("modal-local"), heartbeat_interval=1.0,
                    idle_timeout=5.0) as running:
        yield running


@pytest.fixture
def env(plane, tmp_path):
    """A user's shell: the plane's URL and token, a home of its own, no other profile."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "TRAINGUARD_"))}
    out.update(plane.env(), TRAINGUARD_HOME=str(tmp_path / "tghome"), HOME=str(tmp_path))
    return out


def tg(env, *args, timeout=240, cwd=PROJECT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainguard", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _app(state: dict, name: str) -> dict | None:
    apps = [a for a in state["apps"] if a["description"] == f"trainguard-{name}"]
    return apps[-1] if apps else None


def _call(state: dict, name: str) -> dict | None:
    app = _app(state, name)
    calls = [c for c in state["calls"] if app and c["app_id"] == app["app_id"]]
    return calls[-1] if calls else None


def _attempts(state: dict, name: str) -> list[dict]:
    call = _call(state, name)
    return call["inputs"][0]["attempts"] if call else []


def committed_steps(plane: LocalModal, run: str) -> list[int]:
    """Steps whose manifest the volume holds as committed (what any reader can see)."""
    folder = plane.committed("journeys") / run / "checkpoints"
    return sorted(int(p.parent.name.removeprefix("step-")) for p in
                  folder.glob("step-*/manifest.json")) if folder.exists() else []


def job_of(env, name: str) -> dict:
    rows = json.loads(tg(env, "ps", "--json", "--all").stdout)
    return next(r for r in rows if r["name"] == name)


def test_detached_job_survives_its_launcher_and_resumes_after_crash_and_preemption(
        plane, env, tmp_path):
    secret = "hunter2-" + secrets.token_hex(6)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "trainguard", "run", "train.py", "--backend", "modal",
         "--volume", "journeys", "--name", "journey", "--detach", "--gpu", "H100",
         "--timeout", "10m", "--retries", "2", "--retry-delay", "1", "--add-local",
         "config.json", "--env", f"SECRET_TOKEN={secret}", "--",
         "--steps", "30", "--save-every", "2", "--crash-at", "5", "--sleep", "0.3",
         "--hold-at", "20", "--hold-file", str(tmp_path / "preempted")],
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The launcher dies (kill -9) as soon as the job is recorded: the job must live on.
    call_id = plane.wait_for(lambda s: (_call(s, "journey") or {}).get("call_id"))
    job = plane.wait_for(lambda s: (lambda j: j if call_id in (j["message"] or "") else None)(
        job_of(env, "journey")), timeout=60)
    launcher.send_signal(signal.SIGKILL)  # whether or not it is still tearing down
    launcher.wait()

    # Attempt 1 crashes at step 5; Modal's Retries start attempt 2 in a fresh container.
    attempts = plane.wait_for(lambda s: len(_attempts(s, "journey")) >= 2
                              and _attempts(s, "journey"))
    assert attempts[0]["outcome"] == "failed"
    assert attempts[0]["task_id"] != attempts[1]["task_id"]  # single-use containers
    after_crash = committed_steps(plane, "journey")[-1]

    # Mid-run: `sync` from another process returns a verified, committed step.
    plane.wait_for(lambda s: committed_steps(plane, "journey")[-1] >= after_crash + 4)
    synced = tg(env, "sync", "modal://journeys/journey", tmp_path / "copy")
    assert synced.returncode == 0, synced.stderr
    step = int(synced.stdout.split("step ")[1].split()[0])
    assert step in committed_steps(plane, "journey") and step > after_crash

    # Preemption: SIGINT, the Run commits, a new container resumes from that commit. (The
    # script waits at step 20 until then, so a slow machine cannot finish it first.)
    preempted_task = plane.preempt(call_id)
    attempts = plane.wait_for(lambda s: len(_attempts(s, "journey")) >= 3
                              and _attempts(s, "journey"))
    assert attempts[1]["outcome"] == "preempted" and attempts[1]["task_id"] == preempted_task
    assert attempts[2]["task_id"] not in (attempts[0]["task_id"], attempts[1]["task_id"])
    after_preemption = committed_steps(plane, "journey")[-1]
    (tmp_path / "preempted").touch()  # from here the run may pass step 20

    # `logs -f` from a new process follows the job to its end.
    followed = tg(env, "logs", job["id"], "-f")
    assert followed.returncode == 0, followed.stderr
    out = followed.stdout
    assert "RESUMED 0" in out and f"RESUMED {after_crash}" in out
    assert f"RESUMED {after_preemption}" in out and "STEP 30" in out
    digest = hashlib.sha256(secret.encode()).hexdigest()[:12]
    assert f"CONFIG journey SECRET {digest}" in out  # --add-local and the secret arrived
    status = tg(env, "status", job["id"])
    assert "succeeded" in status.stdout and "commit 30" in status.stdout, status.stdout
    state = plane.state()
    assert not _app(state, "journey")["running"]  # the detached app was stopped
    assert committed_steps(plane, "journey")[-1] == 30

    # What the plane received.
    function = next(f for f in state["functions"] if f["app_id"] == _app(state,
                                                                          "journey")["app_id"])
    assert {"/root/train.py", "/root/helpers_modal.py", "/root/config.json",
            "/root/trainguard/launch/modal_entry.py"} <= set(function["files"])
    assert function["gpu"] == {"type": "H100", "count": 1}
    assert function["timeout"] == 600 and function["single_use_containers"]
    assert function["retries"]["max_retries"] == 2 and function["retries"]["initial_delay"] == 1
    assert any("torch" in c and "pip install" in c for c in function["image_commands"])
    assert function["secrets"] == [{"name": "", "keys": ["SECRET_TOKEN"]}]
    inputs = plane.call(lambda p: [i.data.args for c in p.calls.values() for i in c.inputs])
    assert inputs and not any(secret.encode() in raw for raw in inputs)
    home = Path(env["TRAINGUARD_HOME"])
    for db in home.glob("jobs.db*"):
        assert secret.encode() not in db.read_bytes()
        assert db.stat().st_mode & 0o077 == 0, db
    assert state["unimplemented"] == []


def test_stop_ends_a_modal_job_with_a_final_commit_and_stops_its_app(plane, env):
    launched = tg(env, "run", "train.py", "--backend", "modal", "--volume", "journeys",
                  "--name", "stopper", "--detach", "--add-local", "config.json", "--",
                  "--steps", "100000", "--save-every", "5", "--sleep", "0.05")
    assert launched.returncode == 0, launched.stderr + launched.stdout
    job_id = launched.stdout.split()[-1]
    plane.wait_for(lambda s: len(committed_steps(plane, "stopper")) >= 2)
    before = committed_steps(plane, "stopper")[-1]
    stopped = tg(env, "stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout, stopped.stdout
    state = plane.state()
    attempt = _attempts(state, "stopper")[-1]
    assert attempt["outcome"] == "cancelled"
    container = next(c for c in state["containers"] if c["task_id"] == attempt["task_id"])
    assert not container["preempted"]  # the cancellation, not a SIGINT from the plane
    final = committed_steps(plane, "stopper")[-1]
    printed = Path(container["dir"], "stdout.log").read_text().split()
    last_step = int(printed[len(printed) - 1 - printed[::-1].index("STEP") + 1])
    assert final == last_step > before  # every step the script finished is committed
    assert not _app(state, "stopper")["running"]
    assert "stopped" in tg(env, "status", job_id).stdout

    # `resume` launches the same job again, with the options recorded at launch: a new
    # app and call, resuming from the final commit on the volume.
    resumed = tg(env, "resume", job_id, "--detach")
    assert resumed.returncode == 0 and resumed.stdout.split()[-1] == job_id, resumed.stderr
    plane.wait_for(lambda s: committed_steps(plane, "stopper")[-1] > final)
    assert f"RESUMED {final}" in tg(env, "logs", job_id).stdout
    assert f"RESUMED {final}" in tg(env, "logs", job_id, "--since", "10m").stdout
    assert "STEP" not in tg(env, "logs", job_id, "--since", "2099-01-01").stdout
    tail = tg(env, "logs", job_id, "--tail", "2")
    assert tail.returncode == 0 and 0 < len(tail.stdout.splitlines()) <= 2, tail.stdout
    assert "stopped" in tg(env, "stop", job_id).stdout
    apps = [a for a in plane.state()["apps"] if a["description"] == "trainguard-stopper"]
    assert len(apps) == 2 and not any(a["running"] for a in apps)


def test_the_plane_models_reuse_timeouts_missing_files_and_crashes(plane, env):
    """What a launch that forgets single-use containers, a timeout, a file, or a crash
    meets on Modal, met here by plain functions and the unchanged client."""
    run = subprocess.run([sys.executable, "plain_functions.py"], cwd=PROJECT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    # A retry lands in the warm container whose process just failed...
    assert json.loads(results["reused"])["calls_in_this_process"] == 2
    # ...unless containers are single-use: the retry starts clean (and fails again here).
    assert results["fresh"].startswith("RuntimeError: first call fails")
    assert results["timed"].startswith("FunctionTimeoutError")
    assert results["missing"].startswith("ModuleNotFoundError: No module named 'helpers_modal'")
    assert "exited with code 3 without a result, 3 times" in results["crashing"]
    assert results["unmodelled"].startswith("UnimplementedError: DictGetOrCreate is not "
                                            "modelled")
    state = plane.state()
    assert "DictGetOrCreate" in state["unimplemented"]
    app_id = next(a["app_id"] for a in state["apps"] if a["description"] == "plain-functions")
    assert not next(a for a in state["apps"] if a["app_id"] == app_id)["running"]  # ephemeral


def _doc_commands() -> list[str]:
    """Every command line of docs/modal.md's bash blocks, comments dropped."""
    import re

    text = (ROOT / "docs" / "modal.md").read_text()
    lines = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text,
                                                                   re.S)
             for line in block.splitlines()]
    return [line for line in lines if line.startswith(("trainguard ", "python -m "))]


class _Standalone:
    """``python -m trainguard.testing.modal_local`` started as a user starts it: its first
    line is the MODAL_SERVER_URL to export, then the token and the control URL."""

    def __init__(self, folder: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainguard.testing.modal_local", "--dir", str(folder),
             "--heartbeat", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = self.process.stdout.readline()
        assert first.startswith("MODAL_SERVER_URL=http://127.0.0.1:"), first
        self.exported = dict([first.strip().split("=", 1)] + [
            self.process.stdout.readline().strip().split("=", 1) for _ in range(3)])

    def state(self) -> dict:
        import urllib.request

        url = self.exported["MODAL_LOCAL_CONTROL"] + "/control/state"
        with urllib.request.urlopen(url, timeout=30) as answer:
            return json.load(answer)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C: every container is stopped
        self.process.wait(timeout=60)


def _wait_committed_and_running(plane: _Standalone, timeout: float = 180) -> str:
    """The newest call, once its run has committed a step and still runs (a preemption
    then has a run to interrupt, as a user's would)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = plane.state()
        call = state["calls"][-1] if state["calls"] else None
        folders = [Path(v["committed_dir"]) for v in state["volumes"]]
        if call and call["inputs"][0]["status"] == "running" and any(
                any(f.glob("train/checkpoints/step-*/manifest.json")) for f in folders):
            return call["call_id"]
        time.sleep(0.3)
    raise AssertionError(f"no call got going; state: {state}")


def test_every_command_of_the_modal_docs_runs_against_the_standalone_plane(tmp_path):
    """docs/modal.md, line by line. The first block runs against one standalone plane
    (standing in for Modal); where the doc starts a plane for its rehearsal, a fresh one
    is started, as on a user's laptop."""
    import shlex
    import shutil

    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("plain_functions.py"))
    (project / "requirements.txt").write_text("torch>=2.4\n")
    (project / "data" / "vocab").mkdir(parents=True)
    (project / "data" / "vocab" / "words.txt").write_text("a\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "TRAINGUARD"))}
    base.update(TRAINGUARD_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    planes = [_Standalone(tmp_path / "plane-0")]
    try:
        ids: dict[str, str] = {}
        for line in _doc_commands():
            if line.startswith("python -m trainguard.testing.modal_local >"):
                planes.append(_Standalone(tmp_path / f"plane-{len(planes)}"))
                continue
            env = {**base, **planes[-1].exported}
            if "--nnodes" in line or "--nproc-per-node" in line:
                # Clusters are not modelled and 8 CPU workers are not run here: planned only.
                line = line.replace(" [--rdma]", "").replace(" [--json]", "")
                line += "" if "--dry-run" in line else " --dry-run"
            if "FC_ID" in line:
                ids["FC_ID"] = _wait_committed_and_running(planes[-1])
            args = [ids.get(word, word) for word in shlex.split(line)]
            command = [sys.executable, *args[1:]] if args[0] == "python" else [
                sys.executable, "-m", "trainguard", *args[1:]]
            done = subprocess.run(command, cwd=project, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])
            if args[1] == "run" and "--detach" in args:
                ids["JOB"] = done.stdout.split()[-1]
            if args[1] == "logs" and "-f" in args:
                assert "STEP 30" in done.stdout, done.stdout[-2000:]
                if "FC_ID" in ids:  # the rehearsal's preemption: a resume from its commit
                    resumed = [int(w) for a, w in zip(done.stdout.split(),
                                                      done.stdout.split()[1:], strict=False)
                               if a == "RESUMED"]
                    assert resumed[0] == 0 and resumed[-1] > 0, resumed
            if "preempt" in args:
                assert json.loads(done.stdout)["preempted"].startswith("ta-")
        assert "FC_ID" in ids and (project / "local-copy" / "checkpoints").is_dir()
    finally:
        for plane in planes:
            plane.stop()
