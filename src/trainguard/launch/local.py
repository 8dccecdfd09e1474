"""The local backend (embedded default): a supervisor in the foreground or detached."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from trainguard.errors import RunDirError, TrainguardError
from trainguard.launch.jobs import JobTable, holds_run_dir
from trainguard.launch.spec import JobSpec
from trainguard.launch.supervisor import Supervisor


def launch(spec: JobSpec, *, detach: bool, table: JobTable | None = None,
           on_tick: Callable[[dict], None] | None = None) -> tuple[str, str | None]:
    """Create the job and run it.

    Detached, the supervisor runs as its own session (it survives the terminal and the
    launcher) and this returns at once with status None; in the foreground it returns
    the final status.

    Returns:
        (job id, final status or None when detached).

    Raises:
        RunDirError: ``spec.run_dir`` cannot be a writable directory here (before any job
            is recorded).
        RunDirBusy: another job still runs on ``spec.run_dir``.
    """
    check_run_dir(spec.run_dir)
    table = table or JobTable()
    job_id = table.create(spec, holds=holds_run_dir)
    return job_id, supervise(table, job_id, detach=detach, on_tick=on_tick)


def supervise(table: JobTable, job_id: str, *, detach: bool,
              on_tick: Callable[[dict], None] | None = None) -> str | None:
    """Run the supervisor of the pending job ``job_id``: here until the job ends (its final
    status), or detached as its own session (None)."""
    if not detach:
        return Supervisor(table, job_id, on_tick=on_tick).run()
    spec = table.get(job_id)["spec"]
    log_path = table.job_dir(job_id) / "supervisor.log"
    env = {**os.environ, "TRAINGUARD_HOME": str(table.home)}
    try:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "trainguard.launch.supervisor",
                                     job_id], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                    cwd=spec.cwd)
    except OSError as exc:  # never a job left pending with nobody to run it
        table.update(job_id, status="failed", supervisor_pid=None,
                     message=f"its supervisor could not start: {exc}")
        raise TrainguardError(f"job {job_id}: its supervisor could not start ({exc})") from exc
    table.update(job_id, supervisor_pid=proc.pid)
    return None


def check_run_dir(run_dir: str) -> None:
    """Fail before launching when ``run_dir`` cannot be a writable directory on this machine.

    The script creates its run dir itself; a path under a regular file (or in a read-only
    place) would fail every attempt the same way, each after seconds of start-up.

    Raises:
        RunDirError: the run dir, or the nearest existing path above it, is not a directory
            or not writable (the message names that path and the fix).
    """
    path = os.path.abspath(run_dir)
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    where = "is" if existing == path else f"cannot be made: {existing} is"
    if not os.path.isdir(existing):
        what = ("a file" if os.path.isfile(existing) else
                "a broken link" if os.path.islink(existing) else "not a regular directory")
        raise RunDirError(f"run dir {path} {where} {what}, not a directory; choose a run dir "
                          f"(--run-dir) that is a directory or can be made as one")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run dir {path} {where} not writable; choose a writable place "
                          f"(--run-dir) or make it writable (chmod u+w {existing})")
