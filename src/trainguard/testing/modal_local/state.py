"""What the local control plane knows: apps, functions, calls, inputs, images, mounts.

Plain records, mutated only on the plane's event loop. Ids carry Modal's prefixes
(``ap-``, ``fu-``, ``fc-``, ``in-``, ``im-``, ``mo-``, ``vo-``, ``st-``, ``ta-``,
``bl-``): the client checks some of them (``modal/app.py`` ``is_app_id`` for
``App.lookup(app_id)``, ``runner.py`` ``_create_all_objects`` for ``fu-``).
"""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """``ap-`` + 22 random letters and digits, the shape of Modal's object ids."""
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


@dataclass
class AppRecord:
    """One app: ``APP_STATE_EPHEMERAL`` (stops when its client disconnects) or
    ``APP_STATE_DETACHED`` (runs on until stopped)."""

    app_id: str
    description: str
    state: int
    created: float = field(default_factory=time.time)
    stopped: float | None = None
    function_ids: dict[str, str] = field(default_factory=dict)
    stop_source: int = 0
    disconnected: float = 0.0  # when a detached app's client went away

    @property
    def running(self) -> bool:
        return self.stopped is None


@dataclass
class FunctionRecord:
    """A created function: its definition exactly as the client sent it."""

    function_id: str
    app_id: str
    definition: Any  # api_pb2.Function
    created: float = field(default_factory=time.time)
    choices: list = field(default_factory=list)  # GPUConfig of each ranked copy


@dataclass
class AttemptRecord:
    """One container run of an input."""

    task_id: str
    retry_count: int
    started: float
    ended: float | None = None
    outcome: str = "running"  # succeeded failed timeout preempted crashed cancelled stopped
    exit_code: int | None = None
    message: str = ""


@dataclass
class InputRecord:
    """One input of a function call, with the attempts that ran it."""

    input_id: str
    idx: int
    call: CallRecord
    data: Any  # api_pb2.FunctionInput
    retry_count: int = 0
    status: str = "pending"  # pending running succeeded failed timeout cancelled
    result: Any = None  # api_pb2.GenericResult once final
    data_format: int = 0
    attempts: list[AttemptRecord] = field(default_factory=list)
    consumed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed", "timeout", "cancelled")


@dataclass
class CallRecord:
    """A function call (one ``spawn`` or ``remote``)."""

    call_id: str
    function: FunctionRecord
    invocation_type: int
    created: float = field(default_factory=time.time)
    inputs: list[InputRecord] = field(default_factory=list)
    cancelled: bool = False
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class ImageRecord:
    image_id: str
    definition: Any  # api_pb2.Image

    def env(self, images: dict[str, ImageRecord]) -> dict[str, str]:
        """``ENV`` lines of this image and its base images, base first."""
        out: dict[str, str] = {}
        for base in self.definition.base_images:
            parent = images.get(base.image_id)
            if parent is not None:
                out.update(parent.env(images))
        for command in self.definition.dockerfile_commands:
            if command.startswith("ENV "):
                key, _, value = command[4:].strip().partition("=")
                out[key.strip()] = value.strip().strip('"')
        return out

    def commands(self, images: dict[str, ImageRecord]) -> list[str]:
        """Every Dockerfile command of the image's layers, base first."""
        out: list[str] = []
        for base in self.definition.base_images:
            parent = images.get(base.image_id)
            if parent is not None:
                out += parent.commands(images)
        return out + list(self.definition.dockerfile_commands)


@dataclass
class MountRecord:
    mount_id: str
    files: dict[str, tuple[str, int]]  # remote path -> (sha256 hex, mode)


@dataclass
class SecretRecord:
    secret_id: str
    name: str
    env: dict[str, str]


@dataclass
class LogEntry:
    """One line (or chunk) a container wrote, as ``AppGetLogs`` serves it."""

    entry_id: int
    app_id: str
    task_id: str
    function_id: str
    call_id: str
    input_id: str
    fd: int
    data: str
    timestamp: float


class LogBook:
    """All log entries, with a condition to wait for new ones."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.changed = asyncio.Condition()

    async def add(self, **fields) -> None:
        async with self.changed:
            self.entries.append(LogEntry(entry_id=len(self.entries) + 1,
                                         timestamp=time.time(), **fields))
            self.changed.notify_all()

    async def poke(self) -> None:
        """Wake the streams (an app stopped: they may end)."""
        async with self.changed:
            self.changed.notify_all()
