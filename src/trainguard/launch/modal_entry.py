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
* 75 (preempted or timed out, state committed): :class:`AttemptPreempted` is raised so the input
  is not reported as done; Modal restarts a preempted input by itself, and a timeout
  becomes a Modal retry. Shortly before Modal's per-attempt timeout the script (or the
  torchrun child, which forwards it to every worker) gets SIGINT, so the Run saves and
  commits before Modal kills it. torchrun itself exits 1 when any worker fails, so under
  torchrun the attempt counts as preempted when every worker of this node recorded 75
  (``node_exit_code`` in ``launch/torchrun.py``, shared with the local supervisor);
* anything else: :class:`AttemptFailed` is raised, which Modal's ``Retries`` retries.

The volume is committed once more on every way out (on error too).

Two more things Modal does that the entry answers:

* ``FunctionCall.cancel()`` (``trainguard stop``) reaches a sync function as SIGUSR1,
  whose handler in Modal's runtime raises ``InputCancellation`` wherever the script is
  (``modal/_container_entrypoint.py`` ``call_function``), mid-step included. While the
  script runs, SIGUSR1 is turned into the stop the Run already handles (SIGINT: finish
  the step, save, commit; under torchrun, SIGTERM to the workers), and the
  cancellation is raised once that commit is done, so the input ends as cancelled.
* A retried input may start in a container whose view of the volume is older than the
  last commit (another container made it): the volume is reloaded before the script
  resumes from it.

Paths: the job names container paths (``/root/train.py``, ``/trainguard/RUN``). On Modal
they are used as they are; ``trainguard.testing.modal_local`` runs containers in a local
directory and sets ``TRAINGUARD_CONTAINER_ROOT`` to it (:func:`container_path`).
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

from trainguard.errors import AttemptFailed, AttemptPreempted
from trainguard.launch import worker
from trainguard.launch.torchrun import (
    ENV_EXITS,
    TorchrunConfig,
    describe_workers,
    node_exit_code,
    torchrun_command,
    torchrun_env,
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
#: Where the container's file system is rooted when it is not ``/`` (the local control plane).
ENV_CONTAINER_ROOT = "TRAINGUARD_CONTAINER_ROOT"
#: Where shipped sources live in the container (on ``sys.path``; Modal's working directory).
REMOTE_ROOT = "/root"


def container_path(path: str) -> str:
    """``path`` of the container's file system: unchanged on Modal; under
    ``$TRAINGUARD_CONTAINER_ROOT`` when the local control plane runs the container."""
    root = os.environ.get(ENV_CONTAINER_ROOT)
    if not root or not path.startswith("/"):
        return path
    return os.path.join(root, path.lstrip("/"))


def timeout_margin(timeout: float) -> float:
    """Seconds before Modal's timeout at which the attempt saves and stops: two minutes,
    or a quarter of a short timeout."""
    return min(TIMEOUT_MARGIN, timeout / 4)


def run_script(script: str, args: list[str], run_dir: str, env: dict | None = None) -> int:
    """Run ``script`` as ``__main__`` with ``args`` and ``TRAINGUARD_RUN_DIR``; its exit code."""
    os.environ.update(env or {})
    os.environ["TRAINGUARD_RUN_DIR"] = run_dir
    root = container_path(REMOTE_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)  # the project's root in the container
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


class _Cancellation:
    """Whether Modal cancelled this input (SIGUSR1) while the script ran."""

    def __init__(self) -> None:
        self.received = False


@contextlib.contextmanager
def _signals(pid: int | None, cancellation: _Cancellation):
    """While the script runs: SIGUSR1 (Modal's cancellation) becomes a graceful stop, and
    with a torchrun child (``pid``) SIGINT/SIGTERM are passed on to it; torchrun passes
    them on to every worker, whose Run saves and exits 75.

    Without a child the Run's own SIGINT handler does the stop: SIGUSR1 is re-raised as
    SIGINT in this process. With one, the child gets SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("not on the main thread: preemption and cancellation signals reach the "
                    "script only through Modal's own handlers")
        yield
        return

    def forward(signum: int, frame: object) -> None:
        _signal(pid, signum)

    def cancel(signum: int, frame: object) -> None:
        if not cancellation.received:
            log.warning("modal cancelled this input (SIGUSR1): saving and committing, then "
                        "stopping")
        cancellation.received = True
        if pid is None:
            signal.raise_signal(signal.SIGINT)
        else:
            _signal(pid, signal.SIGTERM)

    handlers = {signal.SIGUSR1: cancel}
    if pid is not None:
        handlers.update({signal.SIGINT: forward, signal.SIGTERM: forward})
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_group(pid: int) -> None:
    """SIGKILL what is left of a child's process group (workers torchrun left behind)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_torchrun(job: dict, deadline: float, cluster=None,
                 cancellation: _Cancellation | None = None) -> tuple[int, dict[int, int]]:
    """Run the job's torchrun command as a child; (this node's exit code, worker codes).

    The child has a process group of its own, which is ended when it exits (or when this
    function is left by an exception), so no worker outlives the attempt."""
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
        try:
            with _signals(child.pid, cancellation or _Cancellation()), \
                    _alarm(deadline, child.pid):
                code = child.wait()
        finally:
            _end_group(child.pid)
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


def _localized(job: dict) -> dict:
    """The job with its container paths resolved (:func:`container_path`)."""
    return {**job, "script": container_path(job["script"]),
            "run_dir": container_path(job["run_dir"]),
            "mount_path": container_path(job["mount_path"])}


def _reload(volume) -> None:
    """See the volume as last committed before resuming from it (a retry may start in a
    container with an older view). A failed reload fails the attempt: resuming from a
    stale view would redo committed steps over newer ones."""
    reload = getattr(volume, "reload", None)
    if reload is None:
        return
    try:
        reload()
    except Exception as exc:
        raise AttemptFailed(f"volume.reload() failed before resuming: {exc}; the attempt would "
                            f"resume from a stale view of the volume") from exc


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
        AttemptPreempted: the script committed and stopped early; Modal runs the input again.
        AttemptFailed: the script failed; Modal's retry policy decides what happens next.
        modal.exception.InputCancellation: the call was cancelled; the script committed
            first.
    """
    from trainguard.store.modal_volume import register_mount, unregister_mount

    shown_run_dir = job["run_dir"]
    job = _localized(job)
    if volume is None:
        volume = _mounted_volume(job["volume"])
    _reload(volume)
    register_mount(job["mount_path"], volume)
    timeout = float(job.get("timeout") or 0)
    deadline = timeout - timeout_margin(timeout)
    workers: dict[int, int] = {}
    cancellation = _Cancellation()
    try:
        if job.get("torchrun"):
            code, workers = run_torchrun(job, deadline, cluster, cancellation)
        else:
            with _signals(None, cancellation), _alarm(deadline, os.getpid()):
                try:
                    code = run_script(job["script"], list(job.get("args", ())),
                                      job["run_dir"], job.get("env"))
                except KeyboardInterrupt:
                    if not cancellation.received:
                        raise
                    code = EXIT_RESUME  # cancelled before the Run was there to save
    finally:
        _commit(volume)
        unregister_mount(job["mount_path"])
    detail = ""
    if job.get("torchrun"):
        detail = f" ({describe_workers(workers, int(job['torchrun']['nproc_per_node']))})"
    if cancellation.received:
        from modal.exception import InputCancellation

        raise InputCancellation(f"{job['script']} was cancelled; it committed first (exit code "
                                f"{code}){detail}")
    if code == EXIT_RESUME:
        raise AttemptPreempted(f"{job['script']} committed and stopped early (exit code 75)"
                               f"{detail}; the input runs again and resumes")
    if code != 0:
        raise AttemptFailed(f"{job['script']} exited with code {code}{detail}")
    return {"exit_code": 0, "run_dir": shown_run_dir}


if __name__ == "__main__":  # a torchrun worker (see WORKER_MODULE)
    sys.exit(worker_main(sys.argv[1:]))
