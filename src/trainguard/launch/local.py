"""The local backend (embedded default): a supervisor in the foreground or detached."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from trainguard.launch.jobs import JobTable
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
    """
    table = table or JobTable()
    job_id = table.create(spec)
    if detach:
        log_path = table.job_dir(job_id) / "supervisor.log"
        env = {**os.environ, "TRAINGUARD_HOME": str(table.home)}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "trainguard.launch.supervisor", job_id],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=spec.cwd)
        table.update(job_id, supervisor_pid=proc.pid)
        return job_id, None
    return job_id, Supervisor(table, job_id, on_tick=on_tick).run()
