"""The gRPC servicer: Modal's ``ModalClient`` service, the RPCs trainguard's path uses.

Written from the protocol (``modal_proto/api.proto`` as installed, and what the client
in ``modal/`` sends and reads), not from Modal's test suite. One class serves both
sides: the public listener (``task`` None: the launcher, ``trainguard ps/logs/sync``,
the ``modal`` CLI) and one listener per container (``task`` set: the container runtime
and code inside the container). Every other RPC of the service answers
``UNIMPLEMENTED`` naming itself, and is recorded in ``Plane.unimplemented`` so a test
can fail on it.

The public listener checks the credentials of every request (``x-modal-token-id`` and
``x-modal-token-secret``, as ``modal/client.py`` ``_get_metadata`` sends them); a
container's listener does not (containers send none: ``CLIENT_TYPE_CONTAINER``).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from modal_proto import api_grpc, api_pb2

from trainguard.testing.modal_local.state import (
    AppRecord,
    FunctionRecord,
    ImageRecord,
    MountRecord,
    new_id,
)

if TYPE_CHECKING:
    from trainguard.testing.modal_local.plane import Plane
    from trainguard.testing.modal_local.tasks import Task

#: ``modal/_utils/blob_utils.py`` BLOCK_SIZE: volume files are served in blocks of it.
BLOCK_SIZE = 8 * 1024 * 1024
_EMPTY = empty_pb2.Empty


def unary(fn):
    """A unary RPC: receive, check, answer what ``fn(self, request)`` returns."""
    async def handler(self, stream) -> None:
        request = await stream.recv_message()
        self._admit(fn.__name__, stream)
        await stream.send_message(await fn(self, request))
    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def streaming(fn):
    """A server-streaming RPC: ``fn(self, request)`` is an async generator of answers."""
    async def handler(self, stream) -> None:
        request = await stream.recv_message()
        self._admit(fn.__name__, stream)
        async for message in fn(self, request):
            await stream.send_message(message)
    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def _builder_version() -> str:
    from typing import get_args

    from modal._image import ImageBuilderVersion

    return max(v for v in get_args(ImageBuilderVersion) if v[0].isdigit())


def _not_found(what: str) -> GRPCError:
    return GRPCError(Status.NOT_FOUND, what)


class Servicer(api_grpc.ModalClientBase):
    """Modal's control plane, the part trainguard uses (see the module docstring)."""

    def __init__(self, plane: Plane, task: Task | None = None) -> None:
        self.plane, self.task = plane, task

    def _admit(self, method: str, stream) -> None:
        self.plane.record(method, self.task)
        if self.task is not None:
            return
        token_id = stream.metadata.get("x-modal-token-id")
        secret = stream.metadata.get("x-modal-token-secret")
        if not token_id or self.plane.tokens.get(token_id) != secret:
            raise GRPCError(Status.UNAUTHENTICATED,
                            f"token {token_id or '(none)'} is not valid for this local Modal "
                            f"control plane; use the token it printed at start")

    def _in_container(self, what: str) -> Task:
        if self.task is None:
            raise GRPCError(Status.FAILED_PRECONDITION,
                            f"{what} must be called inside a container that mounts the Volume")
        return self.task

    # -- session, environment, apps ------------------------------------------------------
    @unary
    async def ClientHello(self, request):
        return api_pb2.ClientHelloResponse()

    @unary
    async def EnvironmentGetOrCreate(self, request):
        """The environment's settings carry the image builder version: the newest one
        the installed client supports (``modal/_image.py`` ``_get_image_builder_version``)."""
        settings = api_pb2.EnvironmentSettings(image_builder_version=_builder_version())
        return api_pb2.EnvironmentGetOrCreateResponse(
            environment_id=self.plane.environment_id,
            metadata=api_pb2.EnvironmentMetadata(name=request.deployment_name or "main",
                                                 settings=settings))

    @unary
    async def AppCreate(self, request):
        app = AppRecord(new_id("ap"), request.description, request.app_state)
        self.plane.apps[app.app_id] = app
        return api_pb2.AppCreateResponse(app_id=app.app_id,
                                         app_page_url=f"{self.plane.http_url}/apps/{app.app_id}",
                                         app_logs_url=f"{self.plane.http_url}/logs/{app.app_id}")

    @staticmethod
    def _get(table: dict, key: str, what: str):
        """``table[key]``, or Modal's NOT_FOUND naming ``what``."""
        found = table.get(key)
        if found is None:
            raise _not_found(f"{what} {key} not found")
        return found

    def _app(self, app_id: str) -> AppRecord:
        return self._get(self.plane.apps, app_id, "App")

    @unary
    async def AppHeartbeat(self, request):
        self._app(request.app_id)
        return _EMPTY()

    @unary
    async def AppPublish(self, request):
        app = self._app(request.app_id)
        app.function_ids = dict(request.function_ids)
        return api_pb2.AppPublishResponse(url=f"{self.plane.http_url}/apps/{app.app_id}",
                                          deployed_at=time.time())

    @unary
    async def AppClientDisconnect(self, request):
        """An ephemeral app ends with its client; a detached one runs on
        (``runner.py`` ``_run_app``: ``APP_STATE_DETACHED`` "will keep running")."""
        app = self._app(request.app_id)
        if app.state != api_pb2.APP_STATE_DETACHED:
            await self.plane.stop_app(app)
        else:  # the client's own log stream ends; the app runs on
            app.state, app.disconnected = api_pb2.APP_STATE_DETACHED_DISCONNECTED, time.time()
            await self.plane.logs.poke()
        return _EMPTY()

    @unary
    async def AppGetOrCreate(self, request):
        """``App.lookup(app_id)``: apps are looked up by id only (nothing is deployed)."""
        app = self.plane.apps.get(request.app_name)
        if app is None:
            raise _not_found(f"App {request.app_name!r} not found (the local control plane "
                             f"looks apps up by id only)")
        return api_pb2.AppGetOrCreateResponse(app_id=app.app_id)

    @unary
    async def AppStop(self, request):
        await self.plane.stop_app(self._app(request.app_id), request.source)
        return _EMPTY()

    # -- logs ----------------------------------------------------------------------------
    @staticmethod
    def _matches(entry, request, source: int) -> bool:
        return (entry.app_id == request.app_id
                and (not request.function_call_id or entry.call_id == request.function_call_id)
                and (not request.task_id or entry.task_id == request.task_id)
                and (not source or entry.fd == source))

    @staticmethod
    def _batches(entries) -> list:
        batches: list = []
        for e in entries:
            if not batches or batches[-1].task_id != e.task_id:
                batches.append(api_pb2.TaskLogsBatch(task_id=e.task_id,
                                                     function_id=e.function_id))
            batches[-1].items.append(api_pb2.TaskLogs(
                data=e.data, file_descriptor=e.fd, timestamp=e.timestamp,
                function_call_id=e.call_id, input_id=e.input_id, container_id=e.task_id))
            batches[-1].entry_id = str(e.entry_id)
        return batches

    @streaming
    async def AppGetLogs(self, request):
        """New log entries after ``last_entry_id``, waiting up to ``timeout`` for more;
        ``app_done`` once the app has stopped and everything was sent. A stream opened
        before a detached app's client disconnected ends then (the client waits for it:
        ``runner.py`` ``_run_app`` awaits its logs loop after disconnecting)."""
        app = self._app(request.app_id)
        opened = time.time()
        book = self.plane.logs
        seen = int(request.last_entry_id) if request.last_entry_id.isdigit() else 0
        deadline = time.monotonic() + (request.timeout or 55)
        while True:
            async with book.changed:
                fresh = [e for e in book.entries[seen:]
                         if self._matches(e, request, request.file_descriptor)]
                seen = len(book.entries)
                ended = not app.running or app.disconnected > opened
                if not fresh and not ended:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    try:
                        await asyncio.wait_for(book.changed.wait(), left)
                    except asyncio.TimeoutError:
                        return
                    continue
            for batch in self._batches(fresh):
                yield batch
            if (not app.running or app.disconnected > opened) and seen == len(book.entries):
                yield api_pb2.TaskLogsBatch(app_done=True, entry_id=str(seen))
                return

    @unary
    async def AppFetchLogs(self, request):
        """The newest ``limit`` entries between ``since`` and ``until``, oldest first."""
        self._app(request.app_id)
        since = request.since.seconds + request.since.nanos / 1e9
        until = request.until.seconds + request.until.nanos / 1e9 if request.HasField(
            "until") else time.time()
        entries = [e for e in self.plane.logs.entries if since <= e.timestamp <= until
                   and self._matches(e, request, request.source)]
        if request.limit:
            entries = entries[-request.limit:]
        return api_pb2.AppFetchLogsResponse(batches=self._batches(entries))

    # -- images, mounts, blobs -----------------------------------------------------------
    @unary
    async def ImageGetOrCreate(self, request):
        """Every image "builds" at once: packages come from this interpreter; the image's
        Dockerfile commands are kept so a test can read what would be installed."""
        for base in request.image.base_images:
            if base.image_id not in self.plane.images:
                raise _not_found(f"base image {base.image_id} not found")
        image = ImageRecord(new_id("im"), request.image)
        self.plane.images[image.image_id] = image
        return api_pb2.ImageGetOrCreateResponse(
            image_id=image.image_id,
            result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
            metadata=api_pb2.ImageMetadata(python_version_info=sys.version,
                                           image_builder_version=request.builder_version))

    @unary
    async def MountBatchedCheckExistence(self, request):
        missing = [h for h in request.sha256_hex_hashes if h not in self.plane.files]
        return api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)

    @unary
    async def MountPutFile(self, request):
        if request.WhichOneof("data_oneof") == "data_blob_id":
            data = self.plane.blobs.get(request.data_blob_id)
            if data is None:
                raise _not_found(f"blob {request.data_blob_id} not found")
        elif request.WhichOneof("data_oneof") == "data":
            data = request.data
        else:
            return api_pb2.MountPutFileResponse(exists=request.sha256_hex in self.plane.files)
        if hashlib.sha256(data).hexdigest() != request.sha256_hex:
            raise GRPCError(Status.INVALID_ARGUMENT, f"content does not match sha256 "
                            f"{request.sha256_hex}")
        self.plane.files[request.sha256_hex] = bytes(data)
        return api_pb2.MountPutFileResponse(exists=True)

    @unary
    async def MountGetOrCreate(self, request):
        if request.deployment_name.startswith("modal-client-mount-"):
            # The client's own package, which Modal provides in every container
            # (``modal/mount.py`` ``_get_client_mount``); here: this interpreter's modal.
            mount = MountRecord(new_id("mo"), {})
            self.plane.mounts[mount.mount_id] = mount
            return api_pb2.MountGetOrCreateResponse(mount_id=mount.mount_id)
        if request.deployment_name:
            raise _not_found(f"Mount {request.deployment_name!r} not found (the local control "
                             f"plane has no named mounts)")
        files = {}
        for f in request.files:
            if f.sha256_hex not in self.plane.files:
                raise GRPCError(Status.FAILED_PRECONDITION,
                                f"{f.filename}: content {f.sha256_hex} was never uploaded")
            files[f.filename] = (f.sha256_hex, f.mode)
        mount = MountRecord(new_id("mo"), files)
        self.plane.mounts[mount.mount_id] = mount
        digest = hashlib.sha256("".join(sorted(f"{k}{v[0]}" for k, v in files.items()))
                                .encode()).hexdigest()
        return api_pb2.MountGetOrCreateResponse(
            mount_id=mount.mount_id,
            handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex=digest))

    @unary
    async def BlobCreate(self, request):
        blob_id = new_id("bl")
        self.plane.blobs[blob_id] = b""
        return api_pb2.BlobCreateResponse(
            blob_ids=[blob_id],
            upload_urls=api_pb2.UploadUrlList(items=[f"{self.plane.http_url}/blob/{blob_id}"]))

    @unary
    async def BlobGet(self, request):
        if request.blob_id not in self.plane.blobs:
            raise _not_found(f"blob {request.blob_id} not found")
        return api_pb2.BlobGetResponse(download_url=f"{self.plane.http_url}/blob/"
                                                    f"{request.blob_id}")

    # -- functions and calls -------------------------------------------------------------
    @unary
    async def FunctionPrecreate(self, request):
        self._app(request.app_id)
        function_id = request.existing_function_id or new_id("fu")
        self.plane.precreated[function_id] = (request.app_id, request.function_name)
        return api_pb2.FunctionPrecreateResponse(
            function_id=function_id,
            handle_metadata=api_pb2.FunctionHandleMetadata(
                function_name=request.function_name, function_type=request.function_type,
                supported_input_formats=request.supported_input_formats,
                supported_output_formats=request.supported_output_formats,
                max_object_size_bytes=2 * 1024 * 1024, app_id=request.app_id))

    @unary
    async def FunctionCreate(self, request):
        """A function arrives as ``function``, or as ``function_data`` whose ranked
        copies differ in their GPU (a fallback list); the first rank is the one run here,
        as a scheduler with that GPU free would. The answer always carries
        ``function_data`` (``modal/types.py`` ``FunctionInfo._from_function_proto``)."""
        self._app(request.app_id)
        if request.HasField("function_data"):
            data = request.function_data
            ranked = sorted(data.ranked_functions, key=lambda r: r.rank)
            if not ranked:
                raise GRPCError(Status.INVALID_ARGUMENT, "function_data without functions")
            d = ranked[0].function
        else:
            d = request.function
            data = api_pb2.FunctionData(ranked_functions=[
                api_pb2.FunctionData.RankedFunction(rank=0, function=d)])
        if d._experimental_group_size > 1:
            raise GRPCError(Status.UNIMPLEMENTED, "clustered functions (modal.clustered) are "
                            "not modelled by the local Modal control plane")
        self._check_references(d)
        function = FunctionRecord(request.existing_function_id or new_id("fu"),
                                  request.app_id, d)
        function.choices = [r.function.resources.gpu_config for r in data.ranked_functions]
        self.plane.functions[function.function_id] = function
        return api_pb2.FunctionCreateResponse(function_id=function.function_id, function=d,
                                              function_data=data,
                                              handle_metadata=self.plane.handle_metadata(function))

    def _check_references(self, d) -> None:
        for mount_id in d.mount_ids:
            if mount_id not in self.plane.mounts:
                raise _not_found(f"mount {mount_id} not found")
        if d.image_id not in self.plane.images:
            raise _not_found(f"image {d.image_id} not found")
        for vm in d.volume_mounts:
            if vm.volume_id not in self.plane.volumes_by_id:
                raise _not_found(f"volume {vm.volume_id} not found")
        for secret_id in d.secret_ids:
            if secret_id not in self.plane.secrets_by_id:
                raise _not_found(f"secret {secret_id} not found")

    @unary
    async def FunctionMap(self, request):
        function = self._get(self.plane.functions, request.function_id, "function")
        if not self.plane.apps[function.app_id].running:
            raise GRPCError(Status.FAILED_PRECONDITION, f"app {function.app_id} is stopped")
        if not request.pipelined_inputs:
            raise GRPCError(Status.UNIMPLEMENTED, "FunctionMap without pipelined inputs (map, "
                            "spawn_map) is not modelled by the local Modal control plane")
        call = self.plane.new_call(function, request.pipelined_inputs,
                                   request.function_call_invocation_type)
        return api_pb2.FunctionMapResponse(
            function_call_id=call.call_id,
            pipelined_inputs=[api_pb2.FunctionPutInputsResponseItem(
                idx=i.idx, input_id=i.input_id, input_jwt=f"jwt-{i.input_id}")
                for i in call.inputs],
            retry_policy=function.definition.retry_policy,
            function_call_jwt=f"jwt-{call.call_id}", sync_client_retries_enabled=False)

    def _call(self, call_id: str):
        return self._get(self.plane.calls, call_id, "function call")

    @unary
    async def FunctionGetOutputs(self, request):
        """Outputs of the finished inputs in ``[start_idx, end_idx]``, waiting up to
        ``timeout`` seconds for one."""
        call = self._call(request.function_call_id)
        wanted = [i for i in call.inputs if request.start_idx <= i.idx <= request.end_idx]
        pending = [i for i in wanted if not i.final]
        if pending and request.timeout > 0:
            waits = [asyncio.create_task(i.done.wait()) for i in pending]
            await asyncio.wait(waits, timeout=request.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        out = api_pb2.FunctionGetOutputsResponse(last_entry_id="0-0")
        for inp in wanted:
            if inp.final and not inp.consumed:
                out.outputs.append(api_pb2.FunctionGetOutputsItem(
                    result=inp.result, idx=inp.idx, input_id=inp.input_id,
                    data_format=inp.data_format, retry_count=inp.retry_count))
                if request.clear_on_success and inp.status == "succeeded":
                    inp.consumed = True
        out.num_unfinished_inputs = sum(not i.final for i in call.inputs)
        return out

    @unary
    async def FunctionCallCancel(self, request):
        self.plane.cancel(self._call(request.function_call_id), request.terminate_containers)
        return _EMPTY()

    @unary
    async def FunctionCallFromId(self, request):
        call = self._call(request.function_call_id)
        return api_pb2.FunctionCallFromIdResponse(
            function_call_id=call.call_id, num_inputs=len(call.inputs),
            metadata=api_pb2.FunctionCallHandleMetadata(
                app_id=call.function.app_id, function_id=call.function.function_id))

    @unary
    async def FunctionCallGetInfo(self, request):
        call = self._call(request.function_call_id)

        def count(*statuses: str):
            return api_pb2.InputCategoryInfo(total=sum(i.status in statuses
                                                       for i in call.inputs))

        return api_pb2.FunctionCallGetInfoResponse(info=api_pb2.FunctionCallInfo(
            function_call_id=call.call_id, created_at=call.created,
            total_inputs=len(call.inputs), succeeded_inputs=count("succeeded"),
            failed_inputs=count("failed"), timeout_inputs=count("timeout"),
            cancelled_inputs=count("cancelled"), pending_inputs=count("pending", "running")))

    # -- secrets -------------------------------------------------------------------------
    @unary
    async def SecretGetOrCreate(self, request):
        """``Secret.from_name`` (looked up), ``Secret.from_dict`` (an anonymous secret),
        ``modal secret create`` (named, created)."""
        creation = request.object_creation_type
        name = request.deployment_name
        secret = self.plane.secrets.get(name) if name else None
        if creation in (api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP,
                        api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL) or (
                name and creation != api_pb2.OBJECT_CREATION_TYPE_UNSPECIFIED):
            if secret is not None and creation == \
                    api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
                raise GRPCError(Status.ALREADY_EXISTS, f"Secret {name!r} already exists")
            secret = self.plane.add_secret(name, dict(request.env_dict))
        elif secret is None:
            raise _not_found(f"Secret {name!r} not found")
        missing = [k for k in request.required_keys if k not in secret.env]
        if missing:
            raise _not_found(f"Secret {name!r} is missing key(s): {', '.join(missing)}")
        return api_pb2.SecretGetOrCreateResponse(
            secret_id=secret.secret_id,
            metadata=api_pb2.SecretMetadata(name=name, keys=sorted(secret.env)))

    # -- volumes -------------------------------------------------------------------------
    @unary
    async def VolumeGetOrCreate(self, request):
        create = request.object_creation_type in (
            api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS)
        volume = self.plane.volume(request.deployment_name, create)
        if volume is None:
            raise _not_found(f"Volume {request.deployment_name!r} not found")
        metadata = api_pb2.VolumeMetadata(version=api_pb2.VOLUME_FS_VERSION_V1,
                                          name=volume.name)
        return api_pb2.VolumeGetOrCreateResponse(volume_id=volume.volume_id,
                                                 version=api_pb2.VOLUME_FS_VERSION_V1,
                                                 metadata=metadata)

    def _volume(self, volume_id: str):
        return self._get(self.plane.volumes_by_id, volume_id, "Volume")

    @streaming
    async def VolumeListFiles(self, request):
        """Committed entries only: what readers outside the container can see."""
        volume = self._volume(request.volume_id)
        try:
            entries = volume.entries(request.path, request.recursive)
        except FileNotFoundError:
            raise _not_found(f"No such file or directory: {request.path}") from None
        out = api_pb2.VolumeListFilesResponse()
        for path, is_dir, size, mtime in entries:
            out.entries.append(api_pb2.FileEntry(
                path=path, size=size, mtime=int(mtime),
                type=api_pb2.FileEntry.DIRECTORY if is_dir else api_pb2.FileEntry.FILE))
        yield out

    @unary
    async def VolumeGetFile2(self, request):
        """Block URLs for a committed file's byte range (the file as of this request)."""
        volume = self._volume(request.volume_id)
        try:
            data = volume.read(request.path)
        except FileNotFoundError:
            raise _not_found(f"No such file: {request.path}") from None
        start = min(request.start, len(data))
        length = len(data) - start if not request.len else min(request.len, len(data) - start)
        token = self.plane.http.snapshot(data[start:start + length])
        first, last = start // BLOCK_SIZE, max(start, start + length - 1) // BLOCK_SIZE
        urls = []
        pos = start
        for block in range(first, last + 1 if length else first):
            end = min(start + length, (block + 1) * BLOCK_SIZE)
            urls.append(f"{self.plane.http_url}/block/{token}/{pos - start}/{end - pos}")
            pos = end
        return api_pb2.VolumeGetFile2Response(get_urls=urls, size=len(data), start=start,
                                              len=length)

    @unary
    async def VolumeCommit(self, request):
        view = self._view(self._in_container("Volume.commit()"), request.volume_id)
        await asyncio.to_thread(view.commit)
        return api_pb2.VolumeCommitResponse(skip_reload=False)

    @unary
    async def VolumeReload(self, request):
        view = self._view(self._in_container("Volume.reload()"), request.volume_id)
        await asyncio.to_thread(view.reload)
        return _EMPTY()

    def _view(self, task: Task, volume_id: str):
        view = task.views.get(volume_id)
        if view is None:
            raise _not_found(f"Volume {volume_id} is not mounted in container {task.task_id}")
        return view

    # -- the container side --------------------------------------------------------------
    @unary
    async def ContainerHello(self, request):
        self._in_container("ContainerHello")
        return _EMPTY()

    @unary
    async def ContainerHeartbeat(self, request):
        """Cancellations reach a container here (``_heartbeat_handle_cancellations``)."""
        task = self._in_container("ContainerHeartbeat")
        if task.cancelled_inputs:
            ids, task.cancelled_inputs = task.cancelled_inputs, []
            return api_pb2.ContainerHeartbeatResponse(
                cancel_input_event=api_pb2.CancelInputEvent(input_ids=ids))
        return api_pb2.ContainerHeartbeatResponse()

    @unary
    async def FunctionGetInputs(self, request):
        """The next input for this container; ``kill_switch`` once it has idled past the
        scaledown window, or was told to stop."""
        task = self._in_container("FunctionGetInputs")
        idle = task.function.definition.task_idle_timeout_secs or self.plane.idle_timeout
        while True:
            if task.stopped or task.preempted or time.monotonic() - task.idle_since > idle:
                return api_pb2.FunctionGetInputsResponse(
                    inputs=[api_pb2.FunctionGetInputsItem(kill_switch=True)])
            try:
                attempt = await asyncio.wait_for(task.queue.get(), 1.0)
                break
            except asyncio.TimeoutError:
                continue
        inp = attempt.input
        task.arm_timeout(attempt, inp.call.function.definition.timeout_secs)
        return api_pb2.FunctionGetInputsResponse(inputs=[api_pb2.FunctionGetInputsItem(
            input_id=inp.input_id, input=inp.data, function_call_id=inp.call.call_id,
            function_call_invocation_type=inp.call.invocation_type,
            retry_count=inp.retry_count, attempt_token=f"at-{inp.input_id}-{inp.retry_count}")])

    @unary
    async def FunctionPutOutputs(self, request):
        task = self._in_container("FunctionPutOutputs")
        for item in request.outputs:
            attempt = task.current.get(item.input_id)
            if attempt is not None:
                attempt.deliver(item.result, item.data_format)
        task.idle_since = time.monotonic()
        return _EMPTY()

    @unary
    async def TaskResult(self, request):
        """The container failed outside an input (e.g. the function did not import)."""
        task = self._in_container("TaskResult")
        task.task_result = request.result
        return _EMPTY()


def _unimplemented(name: str):
    async def handler(self, stream) -> None:
        self.plane.record(name, self.task)
        self.plane.unimplemented.append(name)
        raise GRPCError(Status.UNIMPLEMENTED, f"{name} is not modelled by trainguard's local "
                        f"Modal control plane (trainguard.testing.modal_local)")
    handler.__name__ = name
    return handler


for _name in sorted(Servicer.__abstractmethods__):
    setattr(Servicer, _name, _unimplemented(_name))
Servicer.__abstractmethods__ = frozenset()
