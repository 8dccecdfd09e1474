"""The local backend (embedded default): a supervisor in the foreground or detached."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

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
        RunDirBusy: another job still runs on ``spec.run_dir``.
    """
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
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trainguard.launch.supervisor", job_id],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=spec.cwd)
    table.update(job_id, supervisor_pid=proc.pid)
    return None
