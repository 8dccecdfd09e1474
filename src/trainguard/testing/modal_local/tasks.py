"""Containers as local subprocesses, and the life of an input across them.

A container ("task") is a fresh directory and one process: the real container runtime of
the installed client, ``python -m modal._container_entrypoint``, talking gRPC to a
listener of its own (so the plane knows which container asks). Its file system is
``TASK/fs``: the function's mounts unpacked at their remote paths (``/root/train.py`` ->
``TASK/fs/root/train.py``), each volume's private view at its mount path, and a private
``/tmp``. Only what was shipped is there, so a module the launch forgot fails to import
as it would on Modal. The image's Python packages are this interpreter's: what the image
would have installed is recorded (its Dockerfile commands), not reproduced.

Absolute paths cannot be remapped for a process that is not in a chroot: the plane sets
``TRAINGUARD_CONTAINER_ROOT=TASK/fs`` and ``trainguard.launch.modal_entry`` resolves the
container paths of its job under it (on Modal the variable is unset and the prefix is
``/``). The working directory is ``TASK/fs/root`` (Modal's is ``/root``).

How an input lives (each rule cites the modal source or doc it models):

* **Retries**: a failed attempt (a failure result, or a timeout) is run again after
  ``initial_delay * backoff_coefficient ** n`` (at most ``max_delay``) while retries are
  left (``modal/retries.py`` ``Retries``; docs guide/retries). A timeout starts a new
  timeout on each retry (docs guide/timeouts).
* **Containers are reused** unless the function has ``single_use_containers`` (or
  ``max_inputs == 1``): a warm container asks for the next input
  (``_runtime/container_io_manager.py`` ``_generate_inputs``, which returns after one
  input only for single-use containers), so a retry may land in the container whose
  process just failed. An idle container is told to exit (``kill_switch``) after the
  function's ``task_idle_timeout_secs`` (scaledown window).
* **Preemption**: SIGINT to the container, ``preempt_grace`` (30 s) to exit, then
  SIGKILL of every process of the container; the same input then restarts in a new
  container without consuming a retry (docs guide/preemption: "Modal will send an
  interrupt signal (SIGINT)... and restart it on the same input").
* **Timeout**: ``timeout_secs`` after the container received the input, every process of
  the container is killed and the attempt is a timeout (``GENERIC_STATUS_TIMEOUT``,
  which the client raises as ``FunctionTimeoutError``: ``_utils/function_utils.py``
  ``_process_result``).
* **Cancellation** (``FunctionCall.cancel()``): the input's id is handed to the
  container in its next heartbeat answer (``container_io_manager.py``
  ``_heartbeat_handle_cancellations``); the runtime then sends itself SIGUSR1, which
  raises ``InputCancellation`` in a sync function (``_container_entrypoint.py``
  ``call_function``). It is not SIGINT. ``terminate_containers=True`` kills the
  container instead.
* **Crashes** (the process ends without a result, e.g. kill -9 or OOM): the input is
  rescheduled in a new container, at most ``crash_limit`` times (docs guide/retries,
  "Container crashes"), then fails.
* **App stop** (``App.stop()``, or an ephemeral app's client disconnecting:
  ``runner.py`` ``_status_based_disconnect``): containers get SIGINT, the grace, then
  SIGKILL, and unfinished inputs end as terminated. Modal does not document the signal
  sequence of an app stop; this is the preemption sequence, without the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.testing.modal_local.state import AttemptRecord, InputRecord, new_id

if TYPE_CHECKING:
    from trainguard.testing.modal_local.plane import Plane

log = logging.getLogger("trainguard.modal_local")


def _result(status_name: str, message: str):
    from modal_proto import api_pb2

    status = getattr(api_pb2.GenericResult, f"GENERIC_STATUS_{status_name}")
    return api_pb2.GenericResult(status=status, exception=message)


class Task:
    """One container: its directory, its process, its listener, its volume views."""

    def __init__(self, plane: Plane, function) -> None:
        self.plane, self.function = plane, function
        self.task_id = new_id("ta")
        self.dir = plane.root / "tasks" / self.task_id
        self.fs = self.dir / "fs"
        self.views: dict[str, object] = {}  # volume id -> VolumeView
        self.queue: asyncio.Queue = asyncio.Queue()
        self.current: dict[str, Attempt] = {}  # input id -> the attempt running here
        self.cancelled_inputs: list[str] = []  # handed out by the next heartbeat
        self.process: asyncio.subprocess.Process | None = None
        self.server = None
        self.port = 0
        self.exited = asyncio.Event()
        self.exit_code: int | None = None
        self.task_result = None  # a TaskResult (startup failure)
        self.preempted = self.timed_out = self.stopped = False
        self.idle_since = time.monotonic()
        self.started = time.time()
        self._readers: list[asyncio.Task] = []

    @property
    def single_use(self) -> bool:
        d = self.function.definition
        return bool(d.single_use_containers or d.max_inputs == 1)

    @property
    def warm(self) -> bool:
        """Alive, idle, and willing to take another input."""
        return (not self.exited.is_set() and not self.current and not self.single_use
                and not (self.preempted or self.timed_out or self.stopped))

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Lay out the file system, open the listener, start the runtime."""
        await asyncio.to_thread(self._lay_out)
        self.server, self.port = await self.plane.serve_task(self)
        env = self._env()
        args_path = self.dir / "container_arguments.bin"
        args_path.write_bytes(self._container_arguments().SerializeToString())
        env["MODAL_CONTAINER_ARGUMENTS_PATH"] = str(args_path)
        self.process = await asyncio.create_subprocess_exec(
            self.plane.python, "-m", "modal._container_entrypoint",
            cwd=self.fs / "root", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)  # one process group: the container's processes
        from modal_proto import api_pb2

        self._readers = [
            asyncio.create_task(self._pump(self.process.stdout, api_pb2.FILE_DESCRIPTOR_STDOUT)),
            asyncio.create_task(self._pump(self.process.stderr, api_pb2.FILE_DESCRIPTOR_STDERR))]
        asyncio.create_task(self._reap())

    def _lay_out(self) -> None:
        (self.fs / "root").mkdir(parents=True, exist_ok=True)
        (self.fs / "tmp").mkdir(parents=True, exist_ok=True)
        for mount_id in self.function.definition.mount_ids:
            mount = self.plane.mounts[mount_id]
            for remote, (sha, mode) in mount.files.items():
                target = self._container_path(remote)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.plane.files[sha])
                if mode:
                    os.chmod(target, mode & 0o7777)
        for vm in self.function.definition.volume_mounts:
            volume = self.plane.volumes_by_id[vm.volume_id]
            self.views[vm.volume_id] = volume.mount(self._container_path(vm.mount_path))

    def _container_path(self, remote: str) -> Path:
        path = (self.fs / remote.lstrip("/")).resolve()
        if self.fs.resolve() not in path.parents and path != self.fs.resolve():
            raise ValueError(f"container path {remote!r} leaves the container")
        return path

    def _env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "VIRTUAL_ENV")
        env = {k: v for k, v in os.environ.items() if k in keep}
        image = self.plane.images.get(self.function.definition.image_id)
        if image is not None:
            env.update(image.env(self.plane.images))
        for secret_id in self.function.definition.secret_ids:
            env.update(self.plane.secrets_by_id[secret_id].env)
        env.update({
            "HOME": str(self.fs / "root"), "TMPDIR": str(self.fs / "tmp"),
            "PYTHONPATH": str(self.fs / "root"),  # Modal puts /root on the path
            "MODAL_SERVER_URL": f"http://127.0.0.1:{self.port}",
            "MODAL_IS_REMOTE": "1", "MODAL_TASK_ID": self.task_id,
            "MODAL_IMAGE_ID": self.function.definition.image_id,
            "MODAL_ENVIRONMENT": "main", "MODAL_REGION": "local",
            "MODAL_CLOUD_PROVIDER": "CLOUD_PROVIDER_LOCAL",
            "MODAL_HEARTBEAT_INTERVAL": str(self.plane.heartbeat_interval),
            "TRAINGUARD_CONTAINER_ROOT": str(self.fs),
        })
        return env

    def _container_arguments(self):
        from modal_proto import api_pb2

        fn = self.function
        layout = api_pb2.AppLayout(function_ids={fn.definition.function_name: fn.function_id})
        layout.objects.append(api_pb2.Object(
            object_id=fn.function_id, function_handle_metadata=self.plane.handle_metadata(fn)))
        return api_pb2.ContainerArguments(
            task_id=self.task_id, function_id=fn.function_id, app_id=fn.app_id,
            function_def=fn.definition, app_layout=layout, environment_name="main")

    async def _pump(self, stream: asyncio.StreamReader, fd: int) -> None:
        with open(self.dir / ("stdout.log" if fd == 1 else "stderr.log"), "ab") as copy:
            while True:
                line = await stream.readline()
                if not line:
                    return
                copy.write(line)
                copy.flush()
                attempt = next(iter(self.current.values()), None)
                await self.plane.logs.add(
                    app_id=self.function.app_id, task_id=self.task_id,
                    function_id=self.function.function_id,
                    call_id=attempt.input.call.call_id if attempt else "",
                    input_id=attempt.input.input_id if attempt else "", fd=fd,
                    data=line.decode(errors="replace"))

    async def _reap(self) -> None:
        assert self.process is not None
        self.exit_code = await self.process.wait()
        self._kill_group(signal.SIGKILL)  # the container is gone: so is everything in it
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.server is not None:
            self.server.close()
        self.views.clear()  # uncommitted writes die with the container
        self.exited.set()
        self.plane.forget_task(self)

    # -- signals -------------------------------------------------------------------------
    def _kill_group(self, signum: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)

    def _signal_main(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    def interrupt(self, grace: float) -> None:
        """SIGINT now, SIGKILL of the whole container after ``grace`` seconds."""
        self._signal_main(signal.SIGINT)

        async def later() -> None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), grace)
            if not self.exited.is_set():
                log.info("container %s still running %.0f s after SIGINT: SIGKILL",
                         self.task_id, grace)
                self._kill_group(signal.SIGKILL)

        asyncio.create_task(later())

    def kill(self) -> None:
        """SIGKILL every process of the container (a timeout, ``terminate_containers``)."""
        self._kill_group(signal.SIGKILL)

    def preempt(self, grace: float) -> None:
        self.preempted = True
        self.interrupt(grace)

    def arm_timeout(self, attempt: Attempt, seconds: float) -> None:
        async def expire() -> None:
            done = asyncio.create_task(attempt.finished.wait())
            gone = asyncio.create_task(self.exited.wait())
            await asyncio.wait({done, gone}, timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            gone.cancel()
            if not attempt.finished.is_set() and not self.exited.is_set():
                log.info("input %s timed out after %.0f s: killing container %s",
                         attempt.input.input_id, seconds, self.task_id)
                self.timed_out = True
                self.kill()

        if seconds > 0:
            asyncio.create_task(expire())


class Attempt:
    """One input in one container, until the container answers or ends."""

    def __init__(self, input: InputRecord, task: Task, record: AttemptRecord) -> None:
        self.input, self.task, self.record = input, task, record
        self.result = None
        self.data_format = 0
        self.finished = asyncio.Event()

    def deliver(self, result, data_format: int) -> None:
        self.result, self.data_format = result, data_format
        self.finished.set()


async def _sleep_unless_cancelled(inp: InputRecord, seconds: float) -> None:
    if seconds > 0:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(inp.call.cancel_event.wait(), seconds)


def retry_delay(policy, retry: int) -> float:
    """Seconds before retry number ``retry`` (0-based) of a ``FunctionRetryPolicy``."""
    delay = policy.initial_delay_ms / 1000 * (policy.backoff_coefficient or 1) ** retry
    return min(delay, policy.max_delay_ms / 1000 if policy.max_delay_ms else delay)


async def drive(plane: Plane, inp: InputRecord) -> None:
    """Run ``inp`` to a final state: attempts, retries, restarts (rules in the module doc)."""
    function = inp.call.function
    policy = function.definition.retry_policy
    crashes = 0
    try:
        while True:
            if inp.call.cancelled or not plane.apps[function.app_id].running:
                return plane.finish(inp, "cancelled", _result(
                    "TERMINATED", "the function call was cancelled" if inp.call.cancelled
                    else "the app was stopped"))
            attempt = await plane.dispatch(inp)
            await _until_finished(attempt)
            outcome = _outcome(plane, attempt)
            attempt.record.ended, attempt.record.outcome = time.time(), outcome
            attempt.record.exit_code = attempt.task.exit_code
            attempt.task.current.pop(inp.input_id, None)
            if outcome in ("cancelled", "stopped"):
                continue  # the loop's first check ends the input
            if outcome == "preempted":  # restarted once the preempted container is gone
                await attempt.task.exited.wait()
                await _sleep_unless_cancelled(inp, retry_delay(policy, 0))
                continue
            if outcome == "crashed":
                crashes += 1
                if crashes <= plane.crash_limit:
                    continue
                result = attempt.task.task_result or _result(
                    "FAILURE", f"container {attempt.task.task_id} exited with code "
                    f"{attempt.task.exit_code} without a result, {crashes} times")
            elif outcome == "timeout":
                result = _result("TIMEOUT", f"Function timed out after "
                                 f"{function.definition.timeout_secs} seconds")
            else:
                result = attempt.result
            if outcome == "succeeded":
                return plane.finish(inp, "succeeded", result, attempt.data_format)
            if inp.retry_count < policy.retries:
                delay = retry_delay(policy, inp.retry_count)
                inp.retry_count += 1
                inp.status = "pending"
                await _sleep_unless_cancelled(inp, delay)
                continue
            return plane.finish(inp, "timeout" if outcome == "timeout" else "failed", result,
                                attempt.data_format)
    except Exception as exc:  # the plane itself failed: say so in the result, never hang
        log.exception("input %s: the local control plane failed", inp.input_id)
        plane.finish(inp, "failed", _result("INTERNAL_FAILURE", f"local control plane: {exc!r}"))


async def _until_finished(attempt: Attempt) -> None:
    done = asyncio.create_task(attempt.finished.wait())
    gone = asyncio.create_task(attempt.task.exited.wait())
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    for t in (done, gone):
        t.cancel()


def _outcome(plane: Plane, attempt: Attempt) -> str:
    from modal_proto import api_pb2

    task, inp = attempt.task, attempt.input
    if inp.call.cancelled:
        return "cancelled"
    if task.stopped or not plane.apps[task.function.app_id].running:
        return "stopped"
    if task.preempted:
        return "preempted"  # whatever the container answered while it was told to stop
    if task.timed_out:
        return "timeout"
    if attempt.result is None:
        return "crashed"
    if attempt.result.status == api_pb2.GenericResult.GENERIC_STATUS_SUCCESS:
        return "succeeded"
    return "failed"
