"""The plane's HTTP side: what Modal serves from presigned URLs, plus a control endpoint.

* ``PUT/GET /blob/ID``: blob uploads and downloads (``BlobCreate`` hands out the upload
  URL; the client checks the ``ETag`` against its MD5: ``_utils/blob_utils.py``
  ``_upload_to_s3_url``).
* ``GET /block/TOKEN/OFFSET/LENGTH``: one block of a committed volume file, as
  ``VolumeGetFile2`` hands out (``modal/volume.py`` ``read_file``).
* ``GET /control/state``: the plane described as JSON (apps, calls, attempts, volumes).
* ``POST /control/preempt?call=FC_ID`` (or ``task=TA_ID``, ``grace=SECONDS``): preempt a
  running container, as Modal would (``python -m trainguard.testing.modal_local preempt``).
"""

from __future__ import annotations

import collections
import hashlib
import secrets
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from trainguard.testing.modal_local.plane import Plane

#: Snapshots of volume files kept for block downloads (oldest dropped first).
_SNAPSHOTS = 32


class HttpSide:
    """The aiohttp application of a plane."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self._snapshots: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.app = web.Application(client_max_size=1 << 34)
        self.app.add_routes([
            web.put("/blob/{blob_id}", self.put_blob), web.get("/blob/{blob_id}", self.get_blob),
            web.get("/block/{token}/{offset}/{length}", self.get_block),
            web.get("/control/state", self.state), web.post("/control/preempt", self.preempt)])
        self.runner: web.AppRunner | None = None

    async def start(self, host: str) -> str:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def snapshot(self, data: bytes) -> str:
        """Keep ``data`` (a file as committed now) for its block downloads."""
        token = secrets.token_hex(12)
        self._snapshots[token] = data
        while len(self._snapshots) > _SNAPSHOTS:
            self._snapshots.popitem(last=False)
        return token

    async def put_blob(self, request: web.Request) -> web.Response:
        blob_id = request.match_info["blob_id"]
        if blob_id not in self.plane.blobs:
            return web.Response(status=404, text=f"no upload for blob {blob_id}")
        data = await request.read()
        self.plane.blobs[blob_id] = data
        return web.Response(headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    async def get_blob(self, request: web.Request) -> web.Response:
        data = self.plane.blobs.get(request.match_info["blob_id"])
        if data is None:
            return web.Response(status=404, text="no such blob")
        return web.Response(body=data)

    async def get_block(self, request: web.Request) -> web.Response:
        data = self._snapshots.get(request.match_info["token"])
        if data is None:
            return web.Response(status=404, text="block URL expired; read the file again")
        offset, length = int(request.match_info["offset"]), int(request.match_info["length"])
        return web.Response(body=data[offset:offset + length])

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.describe())

    async def preempt(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        grace = float(query["grace"]) if "grace" in query else None
        try:
            task_id = self.plane.preempt(query.get("call"), query.get("task"), grace)
        except LookupError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response({"preempted": task_id})
