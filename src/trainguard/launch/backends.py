"""Where a job runs, behind one seam: :class:`Backend`.

Every job verb of the CLI (``run``, ``ps``, ``status``, ``logs``, ``stop``, ``rm``,
``resume``) goes through :func:`backend_for` and the :class:`Backend` protocol; nothing
above this module asks which backend a job has. Two implement it: :class:`LocalBackend`
(the supervisor on this machine, the embedded default) and
:class:`~trainguard.launch.modal_jobs.ModalBackend` (loaded only for a Modal job, so
local commands never import ``modal``).

A backend says what it cannot do with a :class:`~trainguard.errors.TrainguardError`
naming the fix, and an unreachable service with :class:`BackendUnreachable` (``ps``
then shows what the job table recorded and says why).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from trainguard.errors import BackendUnreachable, TrainguardError
from trainguard.launch import logs as joblogs
from trainguard.launch.jobs import (
    FINAL,
    JobBusy,
    JobTable,
    ended,
    holds_run_dir,
    live_status,
    require_ended,
)
from trainguard.launch.spec import JobSpec
from trainguard.store.lock import pid_alive


@runtime_checkable
class Backend(Protocol):
    """A place jobs run. ``job`` arguments are rows of the :class:`JobTable`."""

    name: str

    def launch(self, spec: JobSpec, *, detach: bool,
               on_tick: Callable[[dict], None] | None = None) -> tuple[str, str | None]:
        """Create and start a job: (job id, final status, or None when detached)."""
        ...

    def refresh(self, job: dict) -> dict:
        """The job's row as it stands where it runs (``status`` ``lost`` when nothing
        there runs it any more). Raises :class:`BackendUnreachable`."""
        ...

    def logs(self, job: dict, *, follow: bool, tail: int | None, since: float | None,
             attempt: int | None) -> Iterator[str]:
        """The job's output: ``tail`` lines, written at ``since`` (epoch seconds) or later,
        of ``attempt`` (default: the latest; with ``since``, every attempt since);
        ``follow``: then new output until the job ends."""
        ...

    def stop(self, job: dict, *, now: bool, wait: bool) -> str:
        """Stop the job (it commits first unless ``now``); one line saying how it ended."""
        ...

    def resume(self, job: dict, *, detach: bool,
               on_tick: Callable[[dict], None] | None = None) -> str | None:
        """Start an ended job again with its spec: its run resumes from its last commit.
        The final status, or None when detached."""
        ...

    def forget(self, job: dict) -> None:
        """Release what the backend keeps for an ended job (before ``rm``)."""
        ...


def backend_for(table: JobTable, job: dict | str) -> Backend:
    """The backend of ``job`` (a row, or a backend name)."""
    name = job if isinstance(job, str) else (job.get("backend") or "local")
    if name == "local":
        return LocalBackend(table)
    if name == "modal":
        from trainguard.launch.modal_jobs import ModalBackend

        return ModalBackend(table)
    raise TrainguardError(f"job backend {name!r} is unknown to this trainguard (a job table "
                          f"written by a newer version?); upgrade trainguard")


class LocalBackend:
    """Jobs run by a supervisor on this machine (``launch/supervisor.py``)."""

    name = "local"

    def __init__(self, table: JobTable) -> None:
        self.table = table

    def launch(self, spec: JobSpec, *, detach: bool,
               on_tick: Callable[[dict], None] | None = None) -> tuple[str, str | None]:
        from trainguard.launch.local import launch

        return launch(spec, detach=detach, table=self.table, on_tick=on_tick)

    def refresh(self, job: dict) -> dict:
        return job | {"status": live_status(job)}

    # -- logs ------------------------------------------------------------------------------

    def logs(self, job: dict, *, follow: bool = False, tail: int | None = None,
             since: float | None = None, attempt: int | None = None) -> Iterator[str]:
        job_dir, latest = self.table.job_dir(job["id"]), job["attempt"] or 1
        if attempt is not None and not joblogs.attempt_log(job_dir, attempt).exists():
            raise TrainguardError(f"job {job['id']} has no attempt {attempt} (its attempts: "
                                  f"1 to {job['attempt'] or 0}); drop --attempt for the latest")
        if attempt is not None:
            numbers = [attempt]
        elif since is not None:
            numbers = list(joblogs.attempts_with_output(job_dir, latest, since)) or [latest]
        else:
            numbers = [latest]
        offset = 0
        for n in numbers:
            path = joblogs.attempt_log(job_dir, n)
            if len(numbers) > 1:
                yield f"--- attempt {n} ---\n"
            text, offset = joblogs.read_from(path, joblogs.start_offset(path, tail=tail,
                                                                        since=since))
            yield text
        n = numbers[-1]
        while follow:
            current = self.refresh(self.table.get(job["id"]))
            if attempt is None and (current["attempt"] or 1) > n:  # a new attempt began
                rest, _ = joblogs.read_from(joblogs.attempt_log(job_dir, n), offset)
                yield rest  # the old attempt's last lines (its commit) first
                first, last = n + 1, current["attempt"]
                for n in range(first, last + 1):  # n ends as the newest attempt
                    yield f"--- attempt {n} ---\n"
                    if n < current["attempt"]:
                        yield joblogs.read_from(joblogs.attempt_log(job_dir, n), 0)[0]
                offset = 0
            text, offset = joblogs.read_from(joblogs.attempt_log(job_dir, n), offset)
            if text:
                yield text
                continue
            if current["status"] in (*FINAL, "lost"):
                return
            time.sleep(0.5)

    # -- stop ------------------------------------------------------------------------------

    def stop(self, job: dict, *, now: bool = False, wait: bool = True) -> str:
        job_id = job["id"]
        if live_status(job) == "lost":  # no supervisor to ask: stop the attempt ourselves
            return self._stop_orphan(job, now)
        self.table.update(job_id, stop_requested=2 if now else 1)
        if not wait:
            return f"stop requested for {job_id}"
        limit = job["spec"].stop_grace + 60
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            current = self.refresh(self.table.get(job_id))
            if current["status"] in (*FINAL, "lost"):
                commit = current.get("last_commit_step")
                return (f"job {job_id} {current['status']}"
                        + (f"; last committed step {commit}" if commit is not None else ""))
            time.sleep(0.3)
        raise TrainguardError(f"job {job_id} did not stop within {limit:.0f} s; "
                              f"`trainguard stop {job_id} --now` kills it")

    def _stop_orphan(self, job: dict, now: bool) -> str:
        """The supervisor died; its attempt may live on in its own session. Stop that."""
        pid = job.get("child_pid")
        alive = bool(pid) and pid_alive(pid)
        if alive:
            _signal_group(pid, signal.SIGKILL if now else signal.SIGTERM)  # Run saves on TERM
            deadline = time.monotonic() + (0 if now else job["spec"].stop_grace)
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):
                _signal_group(pid, signal.SIGKILL)
        self.table.update(job["id"], status="stopped", child_pid=None, speed=None,
                          message="stopped by `trainguard stop` after its supervisor was lost")
        return (f"job {job['id']} stopped (its supervisor had died"
                + ("; the training process was stopped too)" if alive else ")"))

    # -- resume, forget --------------------------------------------------------------------

    def resume(self, job: dict, *, detach: bool,
               on_tick: Callable[[dict], None] | None = None) -> str | None:
        from trainguard.launch.local import supervise

        require_ended(job, "resume")
        if not os.path.isdir(job["spec"].cwd):
            raise TrainguardError(f"job {job['id']}'s working directory {job['spec'].cwd} no "
                                  f"longer exists; put it back, or start a new job with "
                                  f"`trainguard run`")
        if not os.path.isfile(job["spec"].script):
            raise TrainguardError(f"job {job['id']}'s script {job['spec'].script} no longer "
                                  f"exists; put it back, or start a new job with "
                                  f"`trainguard run`")
        self.table.reopen(job["id"], holds_run_dir, supervisor_pid=os.getpid(), child_pid=None,
                          speed=None, message=f"resumed by `trainguard resume` after attempt "
                                              f"{job['attempt'] or 0}")
        return supervise(self.table, job["id"], detach=detach, on_tick=on_tick)

    def forget(self, job: dict) -> None:
        require_ended(job, "rm")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the attempt leads its own session: its children go too
    except ProcessLookupError:
        pass


__all__ = ["Backend", "BackendUnreachable", "JobBusy", "LocalBackend", "backend_for", "ended"]
