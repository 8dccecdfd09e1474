"""A local Modal control plane: rehearse a Modal training job on your own machine.

It speaks Modal's real gRPC protocol (the ``ModalClient`` service of the installed
``modal`` client, as moto speaks S3's), so the unchanged client, the unchanged
``modal`` CLI and trainguard's Modal backend run against it with one variable set::

    python -m trainguard.testing.modal_local          # first line: MODAL_SERVER_URL=...
    export MODAL_SERVER_URL=... MODAL_TOKEN_ID=... MODAL_TOKEN_SECRET=...
    trainguard run train.py --backend modal --volume runs --detach
    python -m trainguard.testing.modal_local preempt FC_ID   # as Modal would

Each container is a local subprocess running the installed client's own container
runtime, in a fresh directory holding only what the launch shipped; volumes keep
Modal's commit semantics (``volumes.py``); preemption, timeouts, retries and
cancellation follow the rules in ``tasks.py``, each citing the modal source it models.

In a test::

    with LocalModal(tmp_path) as plane:
        env = plane.env()                 # MODAL_SERVER_URL and a token
        ...                               # run the launcher with env
        plane.state()["functions"]        # what the fake received

Modules: ``plane`` (state), ``servicer`` (RPCs), ``tasks`` (containers, inputs),
``volumes`` (commit semantics), ``http`` (blobs, volume blocks, control endpoint).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["LocalModal"]

log = logging.getLogger("trainguard.modal_local")


class LocalModal:
    """A running local Modal control plane (gRPC + HTTP on 127.0.0.1).

    Args:
        root: directory for its state (default: a temporary one, removed at stop).
        heartbeat_interval: containers' heartbeat period in seconds (Modal's: 15); a
            cancellation reaches a container at its next heartbeat.
        preempt_grace: seconds from SIGINT to SIGKILL on preemption (Modal's: 30).
        crash_limit: restarts of an input whose container died without a result.
        idle_timeout: seconds a reusable container waits for another input.
        port: the gRPC port (0: any free port).
        python: the interpreter that runs containers (default: this one).
    """

    def __init__(self, root: str | Path | None = None, *, heartbeat_interval: float = 15.0,
                 preempt_grace: float = 30.0, crash_limit: int = 2, idle_timeout: float = 60.0,
                 port: int = 0, python: str = sys.executable) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="modal-local-"))
        self.token_id = "ak-local" + secrets.token_hex(8)
        self.token_secret = "as-local" + secrets.token_hex(16)
        self._options = {"heartbeat_interval": heartbeat_interval, "preempt_grace": preempt_grace,
                         "crash_limit": crash_limit, "idle_timeout": idle_timeout,
                         "python": python}
        self._port = port
        self.url = ""
        self.plane = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None

    # -- lifecycle -----------------------------------------------------------------------
    async def serve(self) -> None:
        """Start listening (on the running loop); ``url`` is set when this returns."""
        from grpclib.server import Server

        from trainguard.testing.modal_local.http import HttpSide
        from trainguard.testing.modal_local.plane import Plane
        from trainguard.testing.modal_local.servicer import Servicer

        self.plane = Plane(self.root, tokens={self.token_id: self.token_secret},
                           **self._options)
        self.plane.http = HttpSide(self.plane)
        self.plane.http_url = await self.plane.http.start("127.0.0.1")
        self._server = Server([Servicer(self.plane)])
        await self._server.start("127.0.0.1", self._port)
        port = self._server._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def shutdown(self) -> None:
        """Stop every app (containers get SIGINT, then SIGKILL) and the listeners."""
        if self.plane is None:
            return
        for app in list(self.plane.apps.values()):
            await self.plane.stop_app(app)
        for task in self.plane.running_tasks():
            task.kill()
        deadline = time.monotonic() + 10
        while self.plane.running_tasks() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._server.close()
        await self.plane.http.stop()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:  # drivers and watchers of inputs that will never finish now
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def start(self) -> LocalModal:
        """Run the plane on an event loop in a background thread."""
        ready = concurrent.futures.Future()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self.serve())
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="modal-local", daemon=True)
        self._thread.start()
        ready.result(timeout=30)
        return self

    def stop(self) -> None:
        """Stop the plane and its containers; remove its state if it made it."""
        if self._loop is not None:
            self.call(self.shutdown(), timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalModal:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The variables a client needs: ``MODAL_SERVER_URL`` and a valid token."""
        return {"MODAL_SERVER_URL": self.url, "MODAL_TOKEN_ID": self.token_id,
                "MODAL_TOKEN_SECRET": self.token_secret}

    def call(self, coro_or_fn, timeout: float = 30):
        """Run a coroutine, or a function of the plane, on the plane's loop."""
        if asyncio.iscoroutine(coro_or_fn):
            future = asyncio.run_coroutine_threadsafe(coro_or_fn, self._loop)
        else:
            async def run():
                return coro_or_fn(self.plane)
            future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout)

    def state(self) -> dict:
        """Apps, functions (files, image, GPU, retries, timeout), calls with their
        attempts, containers, volumes, and RPCs answered UNIMPLEMENTED."""
        return self.call(lambda plane: plane.describe())

    def preempt(self, call_id: str | None = None, task_id: str | None = None,
                grace: float | None = None) -> str:
        """Preempt the container running ``call_id`` (SIGINT, grace, SIGKILL, restart)."""
        return self.call(lambda plane: plane.preempt(call_id, task_id, grace))

    def committed(self, volume: str) -> Path:
        """The directory holding ``volume``'s committed state (read it, never write)."""
        return self.call(lambda plane: plane.volumes[volume].committed)

    def add_secret(self, name: str, env: dict[str, str]) -> None:
        """A named secret, as ``modal secret create NAME K=V`` would make it."""
        self.call(lambda plane: plane.add_secret(name, env))

    def rpcs(self) -> list[tuple[str, str]]:
        """Every request received: (method, container id or "")."""
        return self.call(lambda plane: list(plane.rpcs))

    def wait_for(self, predicate, timeout: float = 120, every: float = 0.2):
        """Poll ``predicate(state)`` until it returns something truthy; that value.

        Raises:
            TimeoutError: ``timeout`` seconds passed (the last state is in the message).
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            value = predicate(state)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout:.0f} s; state: {state}")
            time.sleep(every)
