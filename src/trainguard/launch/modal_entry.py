"""What runs inside the Modal container: the training script under the same guard.

``run_job`` registers the mounted volume (so ``trainguard.Run()`` writes through a
:class:`~trainguard.store.ModalVolumeStore`, which commits the volume after every
checkpoint manifest), points ``TRAINGUARD_RUN_DIR`` at the run directory on the volume,
and runs the script. The Run always resumes from the newest committed checkpoint, so a
retried or restarted input continues where it stopped.

How the script runs:

* one process (no ``job["torchrun"]``): with ``runpy`` as ``__main__`` in this process;
* several processes (``job["torchrun"]``): as a child ``python -m torch.distributed.run``
  (the command of :func:`torchrun_argv`, built by ``launch/torchrun.py``). Each worker
  starts as ``python -m trainguard.launch.modal_entry SCRIPT ARGS`` (:func:`worker_main`),
  which registers the volume in that worker too (a registration does not cross
  processes), then runs the script and records its exit code as every trainguard torchrun
  worker does (``launch/worker.py``). On a Modal cluster each node runs
  torchrun with ``--node-rank`` = its cluster rank and ``--master-addr`` = rank 0's
  address, both from ``modal.experimental.get_cluster_info()``.

Exit codes map onto Modal's behaviour, the same in both ways:

* 0: the input succeeds (after a final ``volume.commit()``);
* 75 (preempted or timed out, state committed): :class:`Preempted` is raised so the input
  is not reported as done; Modal restarts a preempted input by itself, and a timeout
  becomes a Modal retry. Shortly before Modal's per-attempt timeout the script (or the
  torchrun child, which forwards it to every worker) gets SIGINT, so the Run saves and
  commits before Modal kills it. torchrun itself exits 1 when any worker fails, so under
  torchrun the attempt counts as preempted when every worker of this node recorded 75
  (``node_exit_code`` in ``launch/torchrun.py``, shared with the local supervisor);
* anything else: :class:`JobFailed` is raised, which Modal's ``Retries`` retries.

The volume is committed once more on every way out (on error too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from trainguard.launch import worker
from trainguard.launch.torchrun import (
    ENV_EXITS,
    TorchrunConfig,
    describe_workers,
    node_exit_code,
    torchrun_env,
    torchrun_command,
    worker_codes,
)
from trainguard.run import EXIT_RESUME

log = logging.getLogger("trainguard.modal")

#: Seconds before Modal's timeout at which the attempt is asked to save and stop.
TIMEOUT_MARGIN = 120.0
#: The module each torchrun worker starts with (:func:`worker_main`).
WORKER_MODULE = "trainguard.launch.modal_entry"
#: Environment of the torchrun workers: the volume to register (exit codes: ``ENV_EXITS``).
ENV_VOLUME, ENV_MOUNT = "TRAINGUARD_MODAL_VOLUME", "TRAINGUARD_MODAL_MOUNT"


class Preempted(RuntimeError):
    """The attempt saved, committed and stopped early (preemption or timeout): run it again."""


class JobFailed(RuntimeError):
    """The training script exited with a failure code."""


def run_script(script: str, args: list[str], run_dir: str, env: dict | None = None) -> int:
    """Run ``script`` as ``__main__`` with ``args`` and ``TRAINGUARD_RUN_DIR``; its exit code."""
    os.environ.update(env or {})
    os.environ["TRAINGUARD_RUN_DIR"] = run_dir
    if "/root" not in sys.path:
        sys.path.insert(0, "/root")  # the project's root in the container
    return worker.run_as_main(script, args)


def master_address(cluster) -> str:
    """Rank 0's address from Modal's cluster info: its IPv4 when Modal gives one, else its
    IPv6 in brackets (the form torchrun's ``--master-addr`` takes)."""
    ipv4 = list(getattr(cluster, "container_ipv4_ips", None) or [])
    if ipv4:
        return ipv4[0]
    address = cluster.container_ips[0]
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def torchrun_argv(job: dict, cluster=None, python: str | None = None) -> list[str]:
    """The torchrun command this container runs for ``job`` (the job has ``"torchrun"``).

    Args:
        job: the plan's job; ``job["torchrun"]`` holds nproc_per_node, nnodes,
            max_restarts and master_port.
        cluster: Modal's cluster info (``rank``, ``container_ips``, optionally
            ``container_ipv4_ips``); required when nnodes > 1, ignored otherwise.
        python: the interpreter (default: this one).

    Raises:
        ValueError: nnodes > 1 without cluster info, or a cluster of another size.
    """
    spec = job["torchrun"]
    nnodes = int(spec.get("nnodes", 1))
    static = {}
    if nnodes > 1:
        if cluster is None:
            raise ValueError(f"a job on {nnodes} nodes needs Modal's cluster info "
                             f"(modal.experimental.get_cluster_info())")
        if len(cluster.container_ips) != nnodes:
            raise ValueError(f"the job asks for {nnodes} nodes but Modal's cluster has "
                             f"{len(cluster.container_ips)} containers")
        static = {"nnodes": str(nnodes), "node_rank": cluster.rank,
                  "master_addr": master_address(cluster),
                  "master_port": int(spec.get("master_port", 29500))}
    config = TorchrunConfig(nproc_per_node=int(spec["nproc_per_node"]),
                            max_restarts=int(spec.get("max_restarts", 0)), **static)
    return torchrun_command(python or sys.executable, job["script"], list(job.get("args", ())),
                            config, entry=WORKER_MODULE)


def _cluster_info():
    """This container's ``modal.experimental.get_cluster_info()`` (rank, container IPs)."""
    import modal.experimental

    return modal.experimental.get_cluster_info()


@contextlib.contextmanager
def _alarm(seconds: float, pid: int):
    """SIGINT to ``pid`` ``seconds`` from now: the Run saves, commits, exits 75."""
    timer = None
    if seconds > 0:
        timer = threading.Timer(seconds, _signal, (pid, signal.SIGINT))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


@contextlib.contextmanager
def _forwarding_signals(pid: int):
    """Pass SIGINT (Modal's preemption notice) and SIGTERM on to ``pid`` while it runs;
    torchrun passes them on to every worker, whose Run saves and exits 75."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("not on the main thread: a preemption signal reaches torchrun only if "
                    "Modal sends it to every process")
        yield
        return
    def forward(signum: int, frame: object) -> None:
        _signal(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_torchrun(job: dict, deadline: float, cluster=None) -> tuple[int, dict[int, int]]:
    """Run the job's torchrun command as a child; (this node's exit code, worker codes)."""
    nnodes = int(job["torchrun"].get("nnodes", 1))
    if nnodes > 1 and cluster is None:
        cluster = _cluster_info()
    command = torchrun_argv(job, cluster)
    trainguard_root = str(Path(__file__).resolve().parents[2])  # /root in the container
    with tempfile.TemporaryDirectory(prefix="trainguard-exits-") as exit_dir:
        env = {**os.environ, **torchrun_env(TIMEOUT_MARGIN), **(job.get("env") or {}),
               "TRAINGUARD_RUN_DIR": job["run_dir"],
               ENV_VOLUME: job["volume"], ENV_MOUNT: job["mount_path"], ENV_EXITS: exit_dir,
               "PYTHONPATH": os.pathsep.join(
                   p for p in (trainguard_root, os.environ.get("PYTHONPATH")) if p)}
        log.info("running %s", " ".join(command))
        child = subprocess.Popen(command, env=env, start_new_session=True)
        with _forwarding_signals(child.pid), _alarm(deadline, child.pid):
            code = child.wait()
        workers = worker_codes(exit_dir)
    return node_exit_code(code, workers, int(job["torchrun"]["nproc_per_node"])), workers


def _mounted_volume(name: str):
    import modal

    return modal.Volume.from_name(name)


def worker_main(argv: list[str]) -> int:
    """One torchrun worker: register the volume, run ``SCRIPT ARGS``, record the exit code.

    Returns:
        The script's exit code (recorded as :func:`trainguard.launch.worker.worker_main`
        does: in ``$TRAINGUARD_EXIT_DIR/local-rank-N``; an uncaught exception is recorded
        as 1 and raised).
    """
    from trainguard.store.modal_volume import register_mount

    if not argv:
        raise SystemExit("usage: python -m trainguard.launch.modal_entry SCRIPT [ARGS...]")
    register_mount(os.environ[ENV_MOUNT], _mounted_volume(os.environ[ENV_VOLUME]))
    run_dir = os.environ["TRAINGUARD_RUN_DIR"]
    return worker.worker_main(argv, run=lambda script, args: run_script(script, args, run_dir))


def _commit(volume) -> None:
    try:
        volume.commit()
    except Exception as exc:  # the checkpoints' own commits already happened; say so
        log.error("final volume.commit() failed: %r", exc)


def run_job(job: dict, volume=None, cluster=None) -> dict:
    """Run one attempt of a job inside Modal (the function the Modal app registers).

    Args:
        job: the plan's job: script, args, run_dir, volume, mount_path, timeout, env, and
            torchrun (None: one process).
        volume: the mounted volume (default ``modal.Volume.from_name(job["volume"])``).
        cluster: Modal's cluster info (default: asked from Modal on a multi-node job).

    Returns:
        ``{"exit_code": 0, "run_dir": ...}`` when the script succeeded.

    Raises:
        Preempted: the script committed and stopped early; Modal runs the input again.
        JobFailed: the script failed; Modal's retry policy decides what happens next.
    """
    from trainguard.store.modal_volume import register_mount, unregister_mount

    if volume is None:
        volume = _mounted_volume(job["volume"])
    register_mount(job["mount_path"], volume)
    deadline = float(job.get("timeout") or 0) - TIMEOUT_MARGIN
    workers: dict[int, int] = {}
    try:
        if job.get("torchrun"):
            code, workers = run_torchrun(job, deadline, cluster)
        else:
            with _alarm(deadline, os.getpid()):
                code = run_script(job["script"], list(job.get("args", ())), job["run_dir"],
                                  job.get("env"))
    finally:
        _commit(volume)
        unregister_mount(job["mount_path"])
    detail = ""
    if job.get("torchrun"):
        detail = f" ({describe_workers(workers, int(job['torchrun']['nproc_per_node']))})"
    if code == EXIT_RESUME:
        raise Preempted(f"{job['script']} committed and stopped early (exit code 75){detail}; "
                        "the input runs again and resumes")
    if code != 0:
        raise JobFailed(f"{job['script']} exited with code {code}{detail}")
    return {"exit_code": 0, "run_dir": job["run_dir"]}


if __name__ == "__main__":  # a torchrun worker (see WORKER_MODULE)
    sys.exit(worker_main(sys.argv[1:]))
