"""Modal multi-GPU and multi-node, offline: the real functions, the container command."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import modal
import modal.experimental
import pytest
from click.testing import CliRunner
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import get_rdzv_endpoint, parse_args

from trainguard.cli import cli
from trainguard.errors import AttemptFailed, AttemptPreempted
from trainguard.launch import JobSpec, RetryPolicy
from trainguard.launch.modal_backend import (
    ModalConfigError,
    ModalOptions,
    build_app,
    build_plan,
    modal_torchrun,
)
from trainguard.launch.modal_entry import (
    WORKER_MODULE,
    node_exit_code,
    run_job,
    torchrun_argv,
)
from trainguard.launch.torchrun import TorchrunConfig

FIXTURE = Path(__file__).parent.parent / "fixtures" / "modal_project"


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(FIXTURE, root)
    return root


def _plan(project, options: ModalOptions, nproc_per_node: int | None):
    spec = JobSpec("train.py", ("--lr", "3"), cwd=str(project), retry=RetryPolicy(2, 0, 2, 60),
                   torchrun=modal_torchrun(options, nproc_per_node))
    return build_plan(spec, options)


def test_single_node_function_takes_eight_h100s_and_runs_standalone_torchrun(project):
    plan = _plan(project, ModalOptions(volume="runs", gpu="H100:8"), 8)
    _, function = build_app(plan)
    info = function.info()  # offline: the FunctionInfo modal built from our arguments
    assert info.gpus == [("H100", 8)] and info.cluster_info is None
    assert plan.command == ["python", "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "8", "--max-restarts", "0", "--module",
                            WORKER_MODULE, "/root/train.py", "--lr", "3"]
    assert plan.job["torchrun"]["nnodes"] == 1 and not plan.clustered


def test_cluster_function_is_really_clustered_with_the_public_decorator(project):
    plan = _plan(project, ModalOptions(volume="runs", gpu="H100:8", nnodes=4, rdma=True), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # modal.experimental.clustered is deprecated in 1.6
        _, function = build_app(plan)
    info = function.info()
    assert info.cluster_info.size == 4 and info.cluster_info.rdma is True
    assert info.gpus == [("H100", 8)]
    assert plan.nproc_per_node == 8  # one worker per GPU when only --nnodes is given
    assert plan.clustered and plan.job["torchrun"] == {
        "nproc_per_node": 8, "nnodes": 4, "master_port": 29500, "max_restarts": 0}


def test_older_modal_uses_the_experimental_decorator(project, monkeypatch):
    monkeypatch.delattr(modal, "clustered")
    plan = _plan(project, ModalOptions(volume="runs", gpu="H100:8", nnodes=2), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, function = build_app(plan)
    assert function.info().cluster_info.size == 2


def test_modal_without_clusters_is_a_clear_error(project, monkeypatch):
    monkeypatch.delattr(modal, "clustered")
    monkeypatch.delattr(modal.experimental, "clustered")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "v",
                                      "--gpu", "H100:8", "--nnodes", "2", "--dry-run"])
    assert result.exit_code == 2 and "no clustered functions" in result.output, result.output
    assert "pip install -U modal" in result.output and "Traceback" not in result.output


def _job(**torchrun) -> dict:
    return {"script": "/root/train.py", "args": ["--lr", "3"],
            "torchrun": {"nproc_per_node": 8, "nnodes": 2, "max_restarts": 1,
                         "master_port": 29500, **torchrun}}


@pytest.mark.parametrize("cluster, master, endpoint_host", [
    (SimpleNamespace(rank=1, container_ips=["fd00::1", "fd00::2"],
                     container_ipv4_ips=["10.0.0.1", "10.0.0.2"]), "10.0.0.1", "10.0.0.1"),
    (SimpleNamespace(rank=1, container_ips=["fd00::1", "fd00::2"]), "[fd00::1]", "fd00::1"),
])
def test_each_node_runs_torchrun_with_its_cluster_rank_and_rank_zero_address(
        cluster, master, endpoint_host):
    argv = torchrun_argv(_job(), cluster, python="/usr/bin/python3")
    assert argv[:3] == ["/usr/bin/python3", "-m", "torch.distributed.run"]
    args = parse_args(argv[3:])  # torchrun's own parser reads what we built
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        "2", 1, master, 29500)
    assert args.nproc_per_node == "8" and args.max_restarts == 1
    assert args.rdzv_backend == "static" and args.module
    assert args.training_script == WORKER_MODULE
    assert args.training_script_args == ["/root/train.py", "--lr", "3"]
    assert parse_rendezvous_endpoint(get_rdzv_endpoint(args), 0) == (endpoint_host, 29500)


def test_cluster_info_must_match_the_job():
    with pytest.raises(ValueError, match="cluster info"):
        torchrun_argv(_job(), None)
    with pytest.raises(ValueError, match="has 3 containers"):
        torchrun_argv(_job(), SimpleNamespace(rank=0, container_ips=["a", "b", "c"]))
    single = torchrun_argv(_job(nnodes=1), None, python="python")
    assert "--standalone" in single and "--node-rank" not in single


def test_static_rendezvous_config_is_validated():
    with pytest.raises(ValueError, match="not both"):
        TorchrunConfig(8, nnodes="2", rdzv_endpoint="h:1", node_rank=0, master_addr="h")
    with pytest.raises(ValueError, match="node_rank"):
        TorchrunConfig(8, nnodes="2", node_rank=2, master_addr="h")
    with pytest.raises(ValueError, match="fixed node count"):
        TorchrunConfig(8, nnodes="1:4", node_rank=0, master_addr="h")


def test_node_exit_code_is_resume_only_when_every_worker_committed_and_stopped():
    assert node_exit_code(1, {0: 75, 1: 75}, 2) == 75
    assert node_exit_code(1, {0: 75, 1: 3}, 2) == 1  # one worker failed: a real failure
    assert node_exit_code(1, {0: 75}, 2) == 1  # a worker died without a word
    assert node_exit_code(0, {}, 2) == 0


def test_preempted_torchrun_workers_save_on_the_volume_and_the_input_resumes(tmp_path):
    """A real torchrun (2 CPU workers): Modal's SIGINT reaches every worker through the
    entry, each worker writes through a ModalVolumeStore, all exit 75 -> AttemptPreempted."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from trainguard.store import open_store\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda s, f: got.append(s))\n"
        "store = type(open_store(os.environ['TRAINGUARD_RUN_DIR'])).__name__\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + os.environ['LOCAL_RANK']), 'w')"
        ".write(store + ' ' + ' '.join(sys.argv[1:]))\n"
        "end = time.time() + 60\n"
        "while not got and time.time() < end:\n"
        "    time.sleep(0.02)\n"
        "raise SystemExit(75 if got else 9)\n")
    job = {"script": str(script), "args": ["--x", "1"], "run_dir": str(tmp_path / "vol/run"),
           "volume": "v", "mount_path": str(tmp_path / "vol"), "timeout": 0, "env": {},
           "torchrun": {"nproc_per_node": 2, "nnodes": 1, "max_restarts": 0,
                        "master_port": 29500}}

    def preempt_when_ready() -> None:  # what Modal does: SIGINT to the function's process
        end = time.time() + 60
        while len(glob.glob(str(tmp_path / "ready-*"))) < 2 and time.time() < end:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    commits = []
    volume = SimpleNamespace(commit=lambda: commits.append(1))
    threading.Thread(target=preempt_when_ready, daemon=True).start()
    with pytest.raises(AttemptPreempted, match=r"\{0: 75, 1: 75\}"):
        run_job(job, volume=volume)
    ready = sorted(Path(p).read_text() for p in glob.glob(str(tmp_path / "ready-*")))
    assert ready == ["ModalVolumeStore --x 1"] * 2 and commits == [1]


def test_failing_worker_fails_the_attempt(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import os\nraise SystemExit(3 if os.environ['LOCAL_RANK'] == '1' else 0)\n")
    job = {"script": str(script), "args": [], "run_dir": str(tmp_path / "vol/run"),
           "volume": "v", "mount_path": str(tmp_path / "vol"), "timeout": 0, "env": {},
           "torchrun": {"nproc_per_node": 2, "nnodes": 1, "max_restarts": 0}}
    with pytest.raises(AttemptFailed, match=r"code 1 .*\{0: 0, 1: 3\}"):
        run_job(job, volume=SimpleNamespace(commit=lambda: None))


@pytest.mark.parametrize("args, message", [
    (["--gpu", "H100:8", "--nproc-per-node", "16"],
     ("--nproc-per-node 16 is more than the 8 GPUs per container of --gpu H100:8; use "
      "--nproc-per-node 8 or fewer")),
    (["--gpu", "H100:8,A100-80GB:4", "--nproc-per-node", "8"], "use --nproc-per-node 4"),
    (["--nproc-per-node", "2"], "needs GPUs, one per process: add --gpu H100:2"),
    (["--gpu", "H100:4", "--nnodes", "2"], "takes every GPU of each node; use --gpu H100:8"),
    (["--nnodes", "2"], "--nnodes 2 needs GPUs"),
    (["--gpu", "H100:8", "--nnodes", "1:4"], "fixed size"),
    (["--gpu", "H100:8", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "drop it"),
    (["--gpu", "H100:8", "--rdma"], "--rdma is for clusters"),
])
def test_bad_combinations_are_one_line_errors(project, monkeypatch, args, message):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "v",
                                      "--dry-run", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_dry_run_shows_gpu_processes_nodes_command_and_cluster(project, monkeypatch):
    monkeypatch.chdir(project)
    base = ["run", "train.py", "--backend", "modal", "--volume", "v", "--gpu", "H100:8",
            "--dry-run"]
    plan = json.loads(CliRunner().invoke(cli, [*base, "--nnodes", "2", "--json"]).output)
    assert (plan["gpu"], plan["nproc_per_node"], plan["nnodes"], plan["clustered"]) == (
        "H100:8", 8, 2, True)
    assert plan["command"][3:13] == ["--nproc-per-node", "8", "--max-restarts", "0",
                                     "--nnodes", "2", "--node-rank", "0", "--master-addr",
                                     "<rank-0-ip>"]
    text = CliRunner().invoke(cli, [*base, "--nproc-per-node", "4"]).output
    assert "processes 4 per node x 1 node (not clustered)" in text
    assert "torch.distributed.run --standalone --nproc-per-node 4" in text
    one = json.loads(CliRunner().invoke(cli, [*base, "--json"]).output)
    assert one["command"] is None and one["nproc_per_node"] is None  # --gpu alone: 1 process


def test_launch_spawns_the_clustered_function_with_the_torchrun_job(project, tmp_path,
                                                                   monkeypatch):
    from trainguard.launch import modal_jobs

    started_ = []

    class Client:
        def start(self, app, function, job, *, detach, started=None):
            started_.append((function.info().cluster_info, job))
            return "ap-1", "fc-1"

    monkeypatch.setattr(modal_jobs, "CLIENT_FACTORY", Client)
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(project)
    out = CliRunner().invoke(cli, ["run", "train.py", "--backend", "modal", "--volume", "v",
                                   "--gpu", "H100:8", "--nnodes", "2", "--no-preflight",
                                   "--detach"])
    assert out.exit_code == 0, out.output
    (cluster, job), = started_
    assert cluster.size == 2 and job["torchrun"]["nnodes"] == 2


def test_options_refuse_a_cluster_without_whole_nodes():
    with pytest.raises(ModalConfigError, match="H100:8"):
        ModalOptions(volume="v", gpu="H100", nnodes=2)
    with pytest.raises(ModalConfigError, match="use --gpu A100-80GB:8"):
        ModalOptions(volume="v", gpu="H100:8,A100-80GB:4", nnodes=2)
