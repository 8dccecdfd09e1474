"""Modal jobs in the job table, through one small seam over the modal client.

:class:`ModalClient` is the only place that talks to Modal (start an app and spawn the
job, poll a function call, print logs, cancel). :class:`RealModalClient` implements it
with ``modal``; tests pass a fake. The app and function-call ids of a job are kept in a
``modal_calls`` table beside ``jobs`` in the same SQLite file, so ``ps``, ``status``,
``logs`` and ``stop`` work for Modal jobs, detached ones included.
"""

from __future__ import annotations

import subprocess
from typing import Protocol

from trainguard.launch.jobs import FINAL, JobTable
from trainguard.launch.modal_backend import ModalOptions, build_app, build_plan
from trainguard.launch.spec import JobSpec

_SCHEMA = ("CREATE TABLE IF NOT EXISTS modal_calls (job_id TEXT PRIMARY KEY, app_id TEXT, "
           "call_id TEXT, app_name TEXT)")


class ModalClient(Protocol):
    """The seam over the modal client: everything that needs Modal's servers."""

    def start(self, app, function, job: dict, *, detach: bool) -> tuple[str, str]:
        """Run ``app`` (detached or not), spawn ``function(job)``; returns (app id, call id)."""
        ...

    def poll(self, call_id: str) -> tuple[str, str]:
        """(status, message): status is ``running``, ``succeeded`` or ``failed``."""
        ...

    def logs(self, app_id: str) -> None:
        """Print the app's logs to stdout."""
        ...

    def cancel(self, call_id: str) -> None:
        """Cancel the function call (its container gets SIGINT: the Run saves and commits)."""
        ...


class RealModalClient:
    """:class:`ModalClient` with the ``modal`` package (needs credentials and network).

    Attached (no ``detach``), ``start`` waits for the call inside ``app.run()``: leaving
    that block stops the app. Detached, the app outlives this process.
    """

    def __init__(self) -> None:
        self._done: dict[str, tuple[str, str]] = {}

    def start(self, app, function, job: dict, *, detach: bool) -> tuple[str, str]:
        import modal

        with modal.enable_output(), app.run(detach=detach):
            call = function.spawn(job)
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

    def logs(self, app_id: str) -> None:
        subprocess.run(["modal", "app", "logs", app_id], check=False)

    def cancel(self, call_id: str) -> None:
        import modal

        modal.FunctionCall.from_id(call_id).cancel()


def _table(table: JobTable) -> JobTable:
    table._db.execute(_SCHEMA)
    return table


def record_call(table: JobTable, job_id: str, app_id: str, call_id: str, app_name: str) -> None:
    """Remember which Modal app and function call run ``job_id``."""
    _table(table)._db.execute("INSERT OR REPLACE INTO modal_calls VALUES (?, ?, ?, ?)",
                              (job_id, app_id, call_id, app_name))


def modal_call(table: JobTable, job_id: str) -> dict | None:
    """``{"app_id", "call_id", "app_name"}`` of a Modal job (None: not a Modal job)."""
    row = _table(table)._db.execute("SELECT app_id, call_id, app_name FROM modal_calls "
                                    "WHERE job_id = ?", (job_id,)).fetchone()
    return dict(row) if row else None


def launch_modal(spec: JobSpec, options: ModalOptions, *, detach: bool, client: ModalClient,
                 table: JobTable | None = None, plan=None) -> tuple[str, str | None]:
    """Build the app from the spec, start it on Modal, and record the job.

    Returns:
        (job id, None when detached, else the final status).
    """
    table = table or JobTable()
    plan = plan or build_plan(spec, options)
    app, function = build_app(plan)
    job_id = table.create(spec, backend="modal")
    table.update(job_id, run_dir=f"modal://{plan.volume}/{spec.name}", status="running",
                 message=f"modal app {plan.app_name}")
    app_id, call_id = client.start(app, function, plan.job, detach=detach)
    record_call(table, job_id, app_id, call_id, plan.app_name)
    table.update(job_id, message=f"modal app {app_id}, call {call_id}")
    if detach:
        return job_id, None
    return job_id, refresh(table, job_id, client)


def refresh(table: JobTable, job_id: str, client: ModalClient) -> str:
    """Ask Modal for the state of a Modal job, record it, and return the status."""
    job = table.get(job_id)
    call = modal_call(table, job_id)
    if call is None or job["status"] in FINAL:
        return job["status"]
    status, message = client.poll(call["call_id"])
    if status != "running":
        table.update(job_id, status=status, message=message or job["message"])
    return status


def stop(table: JobTable, job_id: str, client: ModalClient) -> str:
    """Cancel a Modal job's function call and mark it stopped; returns the status."""
    call = modal_call(table, job_id)
    if call is None:
        raise ValueError(f"job {job_id} is not a Modal job")
    client.cancel(call["call_id"])
    table.update(job_id, status="stopped", stop_requested=1,
                 message=f"cancelled modal call {call['call_id']}")
    return "stopped"
