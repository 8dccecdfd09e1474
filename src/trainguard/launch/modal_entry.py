"""What runs inside the Modal container: the training script under the same guard.

``run_job`` registers the mounted volume (so ``trainguard.Run()`` writes through a
:class:`~trainguard.store.ModalVolumeStore`, which commits the volume after every
checkpoint manifest), points ``TRAINGUARD_RUN_DIR`` at the run directory on the volume,
and runs the script with ``runpy`` as ``__main__``. The Run always resumes from the
newest committed checkpoint, so a retried or restarted input continues where it stopped.

Exit codes map onto Modal's behaviour:

* 0: the input succeeds (after a final ``volume.commit()``);
* 75 (preempted or timed out, state committed): :class:`Preempted` is raised so the input
  is not reported as done; Modal restarts a preempted input by itself, and a timeout
  becomes a Modal retry. Shortly before Modal's per-attempt timeout the container sends
  itself SIGINT, so the Run saves and commits before Modal kills it;
* anything else: :class:`JobFailed` is raised, which Modal's ``Retries`` retries.

The volume is committed once more on every way out (on error too).
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys
import threading

log = logging.getLogger("trainguard.modal")

#: Seconds before Modal's timeout at which the attempt is asked to save and stop.
TIMEOUT_MARGIN = 120.0


class Preempted(RuntimeError):
    """The attempt saved, committed and stopped early (preemption or timeout): run it again."""


class JobFailed(RuntimeError):
    """The training script exited with a failure code."""


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def run_script(script: str, args: list[str], run_dir: str, env: dict | None = None) -> int:
    """Run ``script`` as ``__main__`` with ``args`` and ``TRAINGUARD_RUN_DIR``; its exit code."""
    os.environ.update(env or {})
    os.environ["TRAINGUARD_RUN_DIR"] = run_dir
    sys.argv = [script, *args]
    for path in (os.path.dirname(script), "/root"):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_code(exc)
    return 0


def _alarm(seconds: float) -> threading.Timer | None:
    """SIGINT to this process ``seconds`` from now: the Run saves, commits, exits 75."""
    if seconds <= 0:
        return None
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


def _commit(volume) -> None:
    try:
        volume.commit()
    except Exception as exc:  # the checkpoints' own commits already happened; say so
        log.error("final volume.commit() failed: %r", exc)


def run_job(job: dict, volume=None) -> dict:
    """Run one attempt of a job inside Modal (the function the Modal app registers).

    Args:
        job: the plan's job: script, args, run_dir, volume, mount_path, timeout, env.
        volume: the mounted volume (default ``modal.Volume.from_name(job["volume"])``).

    Returns:
        ``{"exit_code": 0, "run_dir": ...}`` when the script succeeded.

    Raises:
        Preempted: the script committed and stopped early; Modal runs the input again.
        JobFailed: the script failed; Modal's retry policy decides what happens next.
    """
    from trainguard.store.modal_volume import register_mount, unregister_mount

    if volume is None:
        import modal

        volume = modal.Volume.from_name(job["volume"])
    register_mount(job["mount_path"], volume)
    timer = _alarm(float(job.get("timeout") or 0) - TIMEOUT_MARGIN)
    try:
        code = run_script(job["script"], list(job.get("args", ())), job["run_dir"],
                          job.get("env"))
    finally:
        if timer is not None:
            timer.cancel()
        _commit(volume)
        unregister_mount(job["mount_path"])
    if code == 75:
        raise Preempted(f"{job['script']} committed and stopped early (exit code 75); "
                        "the input runs again and resumes")
    if code != 0:
        raise JobFailed(f"{job['script']} exited with code {code}")
    return {"exit_code": 0, "run_dir": job["run_dir"]}
