"""Modal jobs in the job table, through one small seam over the modal client.

:class:`ModalClient` is the only place that talks to Modal (start an app and spawn the
job, poll a function call, read its logs, cancel it, stop the app).
:class:`RealModalClient` implements it with ``modal``'s public API; it runs unchanged
against Modal or against ``trainguard.testing.modal_local`` (``MODAL_SERVER_URL``). The
app and function-call ids of a job are kept in a ``modal_calls`` table beside ``jobs``
in the same SQLite file, so ``ps``, ``status``, ``logs`` and ``stop`` work for Modal
jobs from any process, detached ones included.

The job's app is stopped once the job is seen to end, for any reason (``stop``, or the
first ``ps``/``status``/``logs`` that sees it finished): a detached app otherwise stays
up after its call ended. ``--env`` values never reach the job table: the stored spec
has them masked (they travel to Modal as a ``modal.Secret``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Protocol

from trainguard.errors import TrainguardError
from trainguard.launch.jobs import FINAL, JobTable
from trainguard.launch.modal_backend import ModalOptions, build_app, build_plan
from trainguard.launch.spec import JobSpec

log = logging.getLogger("trainguard.modal")

_SCHEMA = ("CREATE TABLE IF NOT EXISTS modal_calls (job_id TEXT PRIMARY KEY, app_id TEXT, "
           "call_id TEXT, app_name TEXT, app_stopped INTEGER DEFAULT 0)")


class ModalLaunchFailed(TrainguardError):
    """Modal refused or failed the launch (the message names what Modal said)."""

    exit_code = 1


class ModalClient(Protocol):
    """The seam over the modal client: everything that needs Modal's servers."""

    def start(self, app, function, job: dict, *, detach: bool,
              started=lambda app_id, call_id: None) -> tuple[str, str]:
        """Run ``app`` (detached or not), spawn ``function(job)``, tell ``started`` the ids
        at once (before any waiting); returns (app id, call id)."""
        ...

    def poll(self, call_id: str) -> tuple[str, str]:
        """(status, message): status is ``running``, ``succeeded`` or ``failed``."""
        ...

    def logs(self, call_id: str, *, follow: bool, tail: int) -> Iterator[str]:
        """The call's output: the last ``tail`` entries, then (``follow``) new ones until
        the call ends."""
        ...

    def cancel(self, call_id: str, *, terminate: bool = False) -> None:
        """Cancel the function call: the container's Run saves and commits first, or
        (``terminate``) the containers are killed at once."""
        ...

    def stop_app(self, app_id: str) -> None:
        """Stop the app (no container of it keeps running)."""
        ...

    def last_commit(self, run_url: str) -> int | None:
        """The newest step committed in ``modal://VOLUME/RUN`` (None: none yet)."""
        ...


class RealModalClient:
    """:class:`ModalClient` with the ``modal`` package (needs credentials and a server).

    Attached (no ``detach``), ``start`` waits for the call inside ``app.run()``: leaving
    that block stops the app. Detached, the app outlives this process.
    """

    def __init__(self) -> None:
        self._done: dict[str, tuple[str, str]] = {}

    def start(self, app, function, job: dict, *, detach: bool,
              started=lambda app_id, call_id: None) -> tuple[str, str]:
        import modal

        with modal.enable_output(), app.run(detach=detach):
            call = function.spawn(job)
            started(app.app_id, call.object_id)
            if not detach:
                self._done[call.object_id] = self._wait(call, None)
            return app.app_id, call.object_id

    @staticmethod
    def _wait(call, timeout: float | None) -> tuple[str, str]:
        try:
            result = call.get(timeout=timeout)
        except TimeoutError:
            return "running", ""
        except Exception as exc:  # the remote error, re-raised by modal
            return "failed", f"{type(exc).__name__}: {exc}"
        return "succeeded", str(result)

    def poll(self, call_id: str) -> tuple[str, str]:
        import modal

        if call_id in self._done:
            return self._done[call_id]
        return self._wait(modal.FunctionCall.from_id(call_id), 0)

    def logs(self, call_id: str, *, follow: bool, tail: int) -> Iterator[str]:
        import modal

        call = modal.FunctionCall.from_id(call_id)
        if follow:  # FunctionCall.logs.stream ends when the call has ended
            for entry in call.logs.stream():
                yield entry.message
            return
        for entry in call.logs.tail(entries=tail):
            yield entry.message

    def cancel(self, call_id: str, *, terminate: bool = False) -> None:
        import modal

        modal.FunctionCall.from_id(call_id).cancel(terminate_containers=terminate)

    def stop_app(self, app_id: str) -> None:
        import modal

        modal.App.lookup(app_id).stop()

    def last_commit(self, run_url: str) -> int | None:
        from trainguard.checkpoint.format import parse_step_dir
        from trainguard.store.modal_volume import ModalVolumeReader

        steps = [parse_step_dir(key.split("/")[1]) for key in
                 ModalVolumeReader(run_url).list("checkpoints/")
                 if key.endswith("/manifest.json") and key.count("/") == 2]
        return max((s for s in steps if s is not None), default=None)


def _table(table: JobTable) -> JobTable:
    table.sql(_SCHEMA)
    columns = {r[1] for r in table.sql("PRAGMA table_info(modal_calls)")}
    if "app_stopped" not in columns:  # a table made by an older trainguard
        table.sql("ALTER TABLE modal_calls ADD COLUMN app_stopped INTEGER DEFAULT 0")
    return table


def record_call(table: JobTable, job_id: str, app_id: str, call_id: str, app_name: str) -> None:
    """Remember which Modal app and function call run ``job_id``."""
    _table(table).sql("INSERT OR REPLACE INTO modal_calls (job_id, app_id, call_id, app_name) "
                      "VALUES (?, ?, ?, ?)", (job_id, app_id, call_id, app_name))


def modal_call(table: JobTable, job_id: str) -> dict | None:
    """``{"app_id", "call_id", "app_name", "app_stopped"}`` of a Modal job (None: not one)."""
    rows = _table(table).sql("SELECT app_id, call_id, app_name, app_stopped FROM modal_calls "
                             "WHERE job_id = ?", (job_id,))
    return dict(rows[0]) if rows else None


def masked(spec: JobSpec) -> JobSpec:
    """``spec`` with its ``--env`` values replaced by ``***`` (what the job table keeps)."""
    return dataclasses.replace(spec, env={key: "***" for key in spec.env})


def launch_modal(spec: JobSpec, options: ModalOptions, *, detach: bool, client: ModalClient,
                 table: JobTable | None = None, plan=None) -> tuple[str, str | None]:
    """Build the app from the spec, start it on Modal, and record the job.

    Returns:
        (job id, None when detached, else the final status).

    Raises:
        ModalLaunchFailed: Modal refused the app or the call; the job is recorded failed.
    """
    table = table or JobTable()
    plan = plan or build_plan(spec, options)
    app, function = build_app(plan)
    job_id = table.create(masked(spec), backend="modal")
    table.update(job_id, run_dir=f"modal://{plan.volume}/{spec.name}", status="running",
                 message=f"modal app {plan.app_name}")
    def started(app_id: str, call_id: str) -> None:  # recorded before the launcher can die
        record_call(table, job_id, app_id, call_id, plan.app_name)
        table.update(job_id, message=f"modal app {app_id}, call {call_id}")

    try:
        client.start(app, function, plan.job, detach=detach, started=started)
    except Exception as exc:  # Modal's error, said once, without its traceback
        message = f"modal launch failed: {type(exc).__name__}: {exc}"
        if modal_call(table, job_id) is None:  # the call never started
            table.update(job_id, status="failed", message=message)
            raise ModalLaunchFailed(f"job {job_id}: {message}") from exc
        table.update(job_id, message=f"the launcher lost Modal after the job started: {exc}")
    if detach:
        return job_id, None
    return job_id, refresh(table, job_id, client)


def _end_app(table: JobTable, job_id: str, call: dict, client: ModalClient) -> None:
    if call["app_stopped"]:
        return
    client.stop_app(call["app_id"])
    table.sql("UPDATE modal_calls SET app_stopped = 1 WHERE job_id = ?", (job_id,))


def _record_commit(table: JobTable, job: dict, client: ModalClient) -> None:
    """The newest committed step, read from the volume (what ``ps`` shows as COMMIT)."""
    try:
        step = client.last_commit(job["run_dir"]) if job.get("run_dir") else None
    except Exception as exc:  # a nicety of ps/status: never the reason they fail
        log.debug("cannot read the last commit of %s: %r", job["run_dir"], exc)
        return
    if step is not None and step != job.get("last_commit_step"):
        table.update(job["id"], last_commit_step=step, step=step)


def refresh(table: JobTable, job_id: str, client: ModalClient) -> str:
    """Ask Modal for the state of a Modal job, record it, and return the status; a job
    seen ended has its app stopped."""
    job = table.get(job_id)
    call = modal_call(table, job_id)
    if call is None:
        return job["status"]
    status = job["status"]
    if status not in FINAL:
        status, message = client.poll(call["call_id"])
        if status == "failed" and job.get("stop_requested"):
            status, message = "stopped", "stopped by `trainguard stop` (the run committed first)"
        if status != "running":
            table.update(job_id, status=status, message=message or job["message"])
        _record_commit(table, job, client)
    if status in FINAL:
        _end_app(table, job_id, call, client)
    return status


def stop(table: JobTable, job_id: str, client: ModalClient, *, timeout: float = 300.0,
         wait: bool = True, now: bool = False, sleep=time.sleep,
         clock=time.monotonic) -> str:
    """Cancel a Modal job's call, wait for its final commit, then stop its app.

    The container's Run saves and commits when Modal delivers the cancellation; the call
    ends once it has. Without ``wait`` the cancellation is sent and the status left for a
    later ``refresh``. ``now`` kills the containers instead (progress since the last
    commit is lost).

    Returns:
        ``stopped`` (or the status the job ended with meanwhile), or ``stopping`` when it
        did not end within ``timeout`` seconds (or ``wait`` is False).

    Raises:
        ValueError: not a Modal job.
    """
    call = modal_call(table, job_id)
    if call is None:
        raise ValueError(f"job {job_id} is not a Modal job")
    table.update(job_id, stop_requested=2 if now else 1,
                 message=f"cancelling modal call {call['call_id']}")
    client.cancel(call["call_id"], terminate=now)
    if not wait:
        return "stopping"
    deadline = clock() + timeout
    while clock() < deadline:
        status = refresh(table, job_id, client)
        if status in FINAL:
            return status
        sleep(1.0)
    return "stopping"
