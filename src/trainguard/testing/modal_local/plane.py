"""The plane: everything the control plane holds, and the operations on it.

Lives on one asyncio event loop (``LocalModal`` runs it in a thread of its own, or the
standalone server runs it in the main thread). The gRPC handlers (``servicer.py``) and
the HTTP handlers (``http.py``) translate requests into calls here.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from trainguard.testing.modal_local.state import (
    AppRecord,
    AttemptRecord,
    CallRecord,
    FunctionRecord,
    ImageRecord,
    InputRecord,
    LogBook,
    MountRecord,
    SecretRecord,
    new_id,
)
from trainguard.testing.modal_local.tasks import Attempt, Task, drive
from trainguard.testing.modal_local.volumes import Volume

log = logging.getLogger("trainguard.modal_local")

#: Inputs and outputs up to this size travel inline; larger ones as blobs
#: (``FunctionHandleMetadata.max_object_size_bytes``).
MAX_OBJECT_SIZE = 2 * 1024 * 1024


class Plane:
    """The control plane's state (see the package docstring for what it models).

    Args:
        root: directory for volumes, containers and blobs.
        tokens: accepted ``(token_id, token_secret)`` pairs.
        heartbeat_interval: containers' heartbeat period (Modal's default: 15 s); a
            cancellation reaches a container at its next heartbeat.
        preempt_grace: seconds between SIGINT and SIGKILL on preemption and app stop.
        crash_limit: restarts of an input whose container died without a result.
        idle_timeout: seconds a warm container waits for another input when the
            function sets no scaledown window.
        python: the interpreter that runs containers (the "image").
    """

    def __init__(self, root: Path, *, tokens: dict[str, str], heartbeat_interval: float = 15.0,
                 preempt_grace: float = 30.0, crash_limit: int = 2, idle_timeout: float = 60.0,
                 python: str = sys.executable) -> None:
        self.root = Path(root)
        self.tokens = dict(tokens)
        self.heartbeat_interval, self.preempt_grace = heartbeat_interval, preempt_grace
        self.crash_limit, self.idle_timeout, self.python = crash_limit, idle_timeout, python
        self.apps: dict[str, AppRecord] = {}
        self.functions: dict[str, FunctionRecord] = {}
        self.precreated: dict[str, tuple[str, str]] = {}  # function id -> (app id, name)
        self.calls: dict[str, CallRecord] = {}
        self.images: dict[str, ImageRecord] = {}
        self.mounts: dict[str, MountRecord] = {}
        self.files: dict[str, bytes] = {}  # sha256 hex -> content (mount files)
        self.blobs: dict[str, bytes] = {}
        self.volumes: dict[str, Volume] = {}
        self.volumes_by_id: dict[str, Volume] = {}
        self.secrets: dict[str, SecretRecord] = {}
        self.secrets_by_id: dict[str, SecretRecord] = {}
        self.tasks: dict[str, Task] = {}  # every container ever started
        self.logs = LogBook()
        self.rpcs: list[tuple[str, str]] = []  # (method, task id or "") of every request
        self.unimplemented: list[str] = []
        self.http_url = ""
        self.http = None  # the HttpSide (block snapshots), set by LocalModal
        self.environment_id = new_id("en")

    # -- records -------------------------------------------------------------------------
    def record(self, method: str, task: Task | None) -> None:
        self.rpcs.append((method, task.task_id if task else ""))

    def handle_metadata(self, fn: FunctionRecord):
        """The ``FunctionHandleMetadata`` of a function, as clients and containers get it."""
        from modal_proto import api_pb2

        d = fn.definition
        formats = list(d.supported_input_formats) or [api_pb2.DATA_FORMAT_PICKLE]
        outputs = list(d.supported_output_formats) or [api_pb2.DATA_FORMAT_PICKLE]
        return api_pb2.FunctionHandleMetadata(
            function_name=d.function_name, function_type=d.function_type,
            supported_input_formats=formats, supported_output_formats=outputs,
            max_object_size_bytes=MAX_OBJECT_SIZE, app_id=fn.app_id)

    def volume(self, name: str, create: bool) -> Volume | None:
        volume = self.volumes.get(name)
        if volume is None and create:
            volume_id = new_id("vo")
            volume = Volume(volume_id, name, self.root / "volumes" / volume_id)
            self.volumes[name] = self.volumes_by_id[volume_id] = volume
        return volume

    def add_secret(self, name: str, env: dict[str, str]) -> SecretRecord:
        secret = SecretRecord(new_id("st"), name, dict(env))
        self.secrets_by_id[secret.secret_id] = secret
        if name:
            self.secrets[name] = secret
        return secret

    # -- calls and containers ------------------------------------------------------------
    def new_call(self, function: FunctionRecord, items, invocation_type: int) -> CallRecord:
        call = CallRecord(new_id("fc"), function, invocation_type)
        for item in items:
            call.inputs.append(InputRecord(new_id("in"), item.idx, call, item.input))
        self.calls[call.call_id] = call
        for inp in call.inputs:
            asyncio.get_running_loop().create_task(drive(self, inp))
        return call

    async def dispatch(self, inp: InputRecord) -> Attempt:
        """Hand ``inp`` to a warm container of its function, or to a new one."""
        function = inp.call.function
        task = next((t for t in self.tasks.values()
                     if t.function is function and t.warm), None)
        if task is None:
            task = Task(self, function)
            self.tasks[task.task_id] = task
            await task.start()
        attempt = Attempt(inp, task, AttemptRecord(task.task_id, inp.retry_count, time.time()))
        inp.attempts.append(attempt.record)
        inp.status = "running"
        task.current[inp.input_id] = attempt
        await task.queue.put(attempt)
        return attempt

    async def serve_task(self, task: Task):
        """A listener for one container: its requests are served knowing who asks."""
        from grpclib.server import Server

        from trainguard.testing.modal_local.servicer import Servicer

        server = Server([Servicer(self, task)])
        await server.start("127.0.0.1", 0)
        return server, server._server.sockets[0].getsockname()[1]

    def forget_task(self, task: Task) -> None:
        """A container ended (its record stays in ``tasks`` for inspection)."""
        log.info("container %s exited with code %s", task.task_id, task.exit_code)

    def finish(self, inp: InputRecord, status: str, result, data_format: int = 0) -> None:
        inp.status, inp.result, inp.data_format = status, result, data_format
        inp.done.set()

    def running_tasks(self, call: CallRecord | None = None) -> list[Task]:
        tasks = [t for t in self.tasks.values() if not t.exited.is_set()]
        if call is not None:
            tasks = [t for t in tasks if any(a.input.call is call for a in t.current.values())]
        return tasks

    def cancel(self, call: CallRecord, terminate_containers: bool) -> None:
        """``FunctionCall.cancel()``: the running containers hear of it at their next
        heartbeat (or are killed with ``terminate_containers``); the rest ends now."""
        call.cancelled = True
        call.cancel_event.set()
        for task in self.running_tasks(call):
            if terminate_containers:
                task.kill()
            else:
                task.cancelled_inputs += [i for i, a in task.current.items()
                                          if a.input.call is call]

    async def stop_app(self, app: AppRecord, source: int = 0) -> None:
        """Stop an app: its containers get SIGINT, the grace, then SIGKILL."""
        if not app.running:
            return
        app.stopped, app.stop_source = time.time(), source
        for task in self.running_tasks():
            if task.function.app_id == app.app_id:
                task.stopped = True
                task.interrupt(self.preempt_grace)
        for call in self.calls.values():
            if call.function.app_id == app.app_id:
                call.cancel_event.set()  # wake drivers waiting out a retry delay
        await self.logs.poke()

    def preempt(self, call_id: str | None = None, task_id: str | None = None,
                grace: float | None = None) -> str:
        """Preempt the container running ``call_id`` (or container ``task_id``).

        Returns:
            The id of the preempted container.

        Raises:
            LookupError: no running container matches.
        """
        tasks = self.running_tasks(self.calls.get(call_id) if call_id else None)
        if call_id and call_id not in self.calls:
            raise LookupError(f"no function call {call_id}")
        if task_id:
            tasks = [t for t in tasks if t.task_id == task_id]
        if not tasks:
            raise LookupError(f"no running container for {call_id or task_id}")
        task = tasks[0]
        task.preempt(self.preempt_grace if grace is None else grace)
        return task.task_id

    # -- inspection (plain data, for tests and the control endpoint) ---------------------
    def describe(self) -> dict:
        """Apps, functions, calls and attempts as JSON-ready data."""
        from trainguard.testing.modal_local.describe import describe_plane

        return describe_plane(self)
