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

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from typing import Protocol

from trainguard.errors import BackendUnreachable, ModalLaunchFailed, TrainguardError
from trainguard.launch.jobs import FINAL, JobTable, holds_run_dir, require_ended
from trainguard.launch.modal_backend import ModalOptions, build_app, build_plan
from trainguard.launch.spec import JobSpec

log = logging.getLogger("trainguard.modal")

_SCHEMA = ("CREATE TABLE IF NOT EXISTS modal_calls (job_id TEXT PRIMARY KEY, app_id TEXT, "
           "call_id TEXT, app_name TEXT, app_stopped INTEGER DEFAULT 0, options TEXT)")


#: The seam factory: tests set it to build a fake :class:`ModalClient`.
CLIENT_FACTORY = None


def make_client() -> ModalClient:
    """The :class:`ModalClient` to use (:class:`RealModalClient` unless a test set one)."""
    return CLIENT_FACTORY() if CLIENT_FACTORY is not None else RealModalClient()


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

    def logs(self, call_id: str, *, follow: bool, tail: int | None,
             since: float | None = None) -> Iterator[str]:
        """The call's output: its last ``tail`` entries (None: all kept) written at
        ``since`` (epoch seconds) or later, then (``follow``) new ones until the call
        ends."""
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

    def logs(self, call_id: str, *, follow: bool, tail: int | None,
             since: float | None = None) -> Iterator[str]:
        import modal

        call = modal.FunctionCall.from_id(call_id)
        last = None
        if not follow or tail is not None or since is not None:
            # ``logs.tail`` returns the newest entries, oldest first; --since filters them
            for entry in call.logs.tail(entries=tail or 10_000):
                stamp = entry.timestamp.timestamp()
                if since is None or stamp >= since:
                    last = stamp
                    yield entry.message
        if follow:  # FunctionCall.logs.stream ends when the call has ended
            for entry in call.logs.stream():
                if last is None or entry.timestamp.timestamp() > last:
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

        reader = ModalVolumeReader(run_url)
        keys = {parse_step_dir(key.split("/")[1]): key for key in reader.list("checkpoints/")
                if key.endswith("/manifest.json") and key.count("/") == 2}
        for step in sorted((s for s in keys if s is not None), reverse=True)[:8]:
            if _resumable_manifest(bytes(reader.read(keys[step]))):
                return step  # the newest a resume uses: not a mid-step save after an error
        return None


def _resumable_manifest(raw: bytes) -> bool:
    """Whether a manifest parses and is not tagged ``resumable=false`` (a save made
    mid-step after an error, which a resume skips)."""
    try:
        doc = json.loads(raw)
        return doc.get("tags", {}).get("resumable") != "false"
    except (ValueError, AttributeError, RecursionError):
        return False


def _table(table: JobTable) -> JobTable:
    table.sql(_SCHEMA)
    columns = {r[1] for r in table.sql("PRAGMA table_info(modal_calls)")}
    for name, kind in (("app_stopped", "INTEGER DEFAULT 0"), ("options", "TEXT")):
        if name not in columns:  # a table made by an older trainguard
            table.sql(f"ALTER TABLE modal_calls ADD COLUMN {name} {kind}")
    return table


def record_call(table: JobTable, job_id: str, app_id: str, call_id: str, app_name: str,
                options: ModalOptions | None = None) -> None:
    """Remember which Modal app and function call run ``job_id`` (and with which options:
    ``trainguard resume`` launches it again with them)."""
    stored = None
    if options is not None:  # the requirements file's lines are in ``packages`` already
        stored = json.dumps(dataclasses.asdict(options) | {"requirements_file": None})
    _table(table).sql("INSERT OR REPLACE INTO modal_calls (job_id, app_id, call_id, app_name, "
                      "options) VALUES (?, ?, ?, ?, ?)",
                      (job_id, app_id, call_id, app_name, stored))


def modal_call(table: JobTable, job_id: str) -> dict | None:
    """``{"app_id", "call_id", "app_name", "app_stopped", "options"}`` of a Modal job
    (None: not one; ``call_id`` None while a resume starts a new call; ``options`` the
    recorded :class:`ModalOptions` as JSON text, see :func:`recorded_options`)."""
    rows = _table(table).sql("SELECT app_id, call_id, app_name, app_stopped, options FROM "
                             "modal_calls WHERE job_id = ?", (job_id,))
    return dict(rows[0]) if rows else None


_TUPLES = ("packages", "add_local", "secrets")


def recorded_options(call: dict | None) -> ModalOptions | None:
    """The options a Modal job was launched with (None: not recorded, or unreadable)."""
    if not call or not call.get("options"):
        return None
    try:
        doc = json.loads(call["options"])
        return ModalOptions(**{k: tuple(v) if k in _TUPLES else v for k, v in doc.items()})
    except (ValueError, TypeError) as exc:  # ModalConfigError is a ValueError
        log.warning("cannot read the recorded Modal options: %s", exc)
        return None


def masked(spec: JobSpec) -> JobSpec:
    """``spec`` with its ``--env`` values replaced by ``***`` (what the job table keeps)."""
    return dataclasses.replace(spec, env=dict.fromkeys(spec.env, "***"))


def run_url(plan, spec: JobSpec) -> str:
    """The ``modal://VOLUME/NAME`` run directory of a job (what the job table records)."""
    return f"modal://{plan.volume}/{spec.name}"


def launch_modal(spec: JobSpec, options: ModalOptions, *, detach: bool, client: ModalClient,
                 table: JobTable | None = None, plan=None,
                 job_id: str | None = None) -> tuple[str, str | None]:
    """Build the app from the spec, start it on Modal, and record the job.

    Args:
        job_id: an ended job reopened by ``trainguard resume`` (default: a new job).

    Returns:
        (job id, None when detached, else the final status).

    Raises:
        ModalLaunchFailed: Modal refused the app or the call; the job is recorded failed.
        RunDirBusy: another unfinished job runs on the same ``modal://VOLUME/NAME``.
    """
    table = table or JobTable()
    plan = plan or build_plan(spec, options)
    app, function = build_app(plan)
    url = run_url(plan, spec)
    for other in table.sql("SELECT id FROM jobs WHERE run_dir = ? AND backend = 'modal' AND "
                           "status NOT IN ('succeeded', 'failed', 'stopped')", (url,)):
        try:  # a job that ended while nobody looked does not hold the run directory
            refresh(table, other["id"], client)
        except Exception as exc:
            log.debug("cannot refresh modal job %s: %r", other["id"], exc)
    if job_id is None:
        job_id = table.create(masked(spec), backend="modal", run_dir=url, holds=holds_run_dir)
    table.update(job_id, status="running", message=f"modal app {plan.app_name}")

    calls: list[str] = []

    def started(app_id: str, call_id: str) -> None:  # recorded before the launcher can die
        record_call(table, job_id, app_id, call_id, plan.app_name, options)
        table.update(job_id, message=f"modal app {app_id}, call {call_id}")
        calls.append(call_id)

    try:
        client.start(app, function, plan.job, detach=detach, started=started)
    except Exception as exc:  # Modal's error, said once, without its traceback
        message = f"modal launch failed: {type(exc).__name__}: {exc}"
        if not calls:  # this launch's call never started
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
    table.sql("UPDATE modal_calls SET app_stopped = 1 WHERE job_id = ? AND app_id = ?",
              (job_id, call["app_id"]))


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
    if call is None or not call["call_id"]:
        return job["status"]
    status = job["status"]
    if status not in FINAL:
        status, message = client.poll(call["call_id"])
        if status == "failed" and job.get("stop_requested"):
            status, message = "stopped", "stopped by `trainguard stop` (the run committed first)"
        now = modal_call(table, job_id)
        if now is None or now["call_id"] != call["call_id"]:  # resumed meanwhile: a new call
            return table.get(job_id)["status"]
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
    if call is None or not call["call_id"]:  # its launch never started a call
        table.update(job_id, status="stopped", stop_requested=1,
                     message="stopped by `trainguard stop` before Modal started it")
        return "stopped"
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


def _modal_error(exc: Exception) -> bool:
    return type(exc).__module__.startswith(("modal", "grpclib")) or isinstance(
        exc, (ConnectionError, OSError, TimeoutError))


@contextlib.contextmanager
def talking_to_modal(what: str):
    """Modal's own errors (unreachable, refused, not found) as one line naming ``what``."""
    try:
        yield
    except Exception as exc:
        if not _modal_error(exc):
            raise
        raise BackendUnreachable(f"cannot {what}: {type(exc).__name__}: {exc}") from exc


class ModalBackend:
    """Jobs run on Modal: one detached app and function call per job (the
    :class:`~trainguard.launch.backends.Backend` protocol over :class:`ModalClient`).

    Args:
        table: the job table.
        options: what ``launch`` runs with (``trainguard resume`` reads them back from
            the table).
        client: the seam over Modal (default :func:`make_client`).
        plan: a plan already built from ``options`` (the CLI builds it for preflight).
    """

    name = "modal"

    def __init__(self, table: JobTable, options: ModalOptions | None = None,
                 client: ModalClient | None = None, plan=None) -> None:
        self.table, self.options, self.plan = table, options, plan
        self._client = client

    @property
    def client(self) -> ModalClient:
        if self._client is None:
            self._client = make_client()
        return self._client

    def launch(self, spec: JobSpec, *, detach: bool, on_tick=None) -> tuple[str, str | None]:
        if self.options is None:
            raise ValueError("ModalBackend.launch needs options")
        return launch_modal(spec, self.options, detach=detach, client=self.client,
                            table=self.table, plan=self.plan)

    def refresh(self, job: dict) -> dict:
        if job["status"] in FINAL:
            return job
        with talking_to_modal(f"ask Modal how job {job['id']} is doing"):
            refresh(self.table, job["id"], self.client)
        return self.table.get(job["id"])

    def logs(self, job: dict, *, follow: bool = False, tail: int | None = None,
             since: float | None = None, attempt: int | None = None) -> Iterator[str]:
        if attempt is not None:
            raise TrainguardError("--attempt is for local jobs: a Modal job's retries run in "
                                  "one function call, and its logs hold every attempt")
        call = modal_call(self.table, job["id"])
        if call is None or not call["call_id"]:
            raise TrainguardError(f"job {job['id']} has no recorded Modal call (its launch "
                                  f"failed: `trainguard status {job['id']}` says why)")
        with talking_to_modal(f"read the logs of job {job['id']} from Modal"):
            yield from self.client.logs(call["call_id"], follow=follow,
                                        tail=tail if tail is not None or since else 1000,
                                        since=since)

    def stop(self, job: dict, *, now: bool = False, wait: bool = True) -> str:
        if wait:
            log.info("stopping job %s: %s", job["id"], "killing its containers" if now
                     else "the run saves and commits first")
        with talking_to_modal(f"stop job {job['id']} on Modal"):
            status = stop(self.table, job["id"], self.client, wait=wait, now=now,
                          timeout=job["spec"].stop_grace + 300)
        if status == "stopping":
            return (f"stop requested for {job['id']} (modal call cancelled); `trainguard "
                    f"status {job['id']}` shows when it has ended")
        return f"job {job['id']} {status}: {self.table.get(job['id'])['message']}"

    def resume(self, job: dict, *, detach: bool, on_tick=None) -> str | None:
        require_ended(job, "resume")
        call = modal_call(self.table, job["id"])
        options = recorded_options(call)
        if options is None:
            raise TrainguardError(f"job {job['id']}'s Modal options were not recorded (it "
                                  f"never started, or an older trainguard launched it); "
                                  f"launch it again with `trainguard run ... --backend "
                                  f"modal --name {job['name']}`: it resumes from its last "
                                  f"commit on the volume")
        spec = job["spec"]
        if spec.env:
            raise TrainguardError(f"job {job['id']} was launched with --env "
                                  f"{', '.join(sorted(spec.env))}, whose values trainguard "
                                  f"does not keep; launch it again with `trainguard run ... "
                                  f"--backend modal --name {job['name']} --env ...`: it "
                                  f"resumes from its last commit on the volume")
        try:
            plan = build_plan(spec, options)  # what can fail here fails before the reopen
        except (ValueError, OSError) as exc:
            raise TrainguardError(f"job {job['id']} cannot be launched again as it was: "
                                  f"{exc}") from exc
        self.table.reopen(job["id"], holds_run_dir, speed=None,
                          message="resumed by `trainguard resume`")
        # The old call stays recorded (options, app) until the new one exists; a `ps`
        # meanwhile polls nothing.
        self.table.sql("UPDATE modal_calls SET call_id = NULL WHERE job_id = ?", (job["id"],))
        try:
            _, status = launch_modal(spec, options, detach=detach, client=self.client,
                                     table=self.table, plan=plan, job_id=job["id"])
        except BaseException as exc:
            if self.table.get(job["id"])["status"] == "pending":
                self.table.update(job["id"], status="failed",
                                  message=f"`trainguard resume` could not launch it: {exc}")
            raise
        return status

    def forget(self, job: dict) -> None:
        require_ended(job, "rm")
        call = modal_call(self.table, job["id"])
        if call is not None:
            with talking_to_modal(f"stop the Modal app of job {job['id']}"):
                _end_app(self.table, job["id"], call, self.client)
            self.table.sql("DELETE FROM modal_calls WHERE job_id = ?", (job["id"],))
