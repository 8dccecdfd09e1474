"""Modal Volumes: a checkpoint counts only once ``volume.commit()`` has succeeded.

On Modal a write to a mounted Volume is durable and visible to other containers only
after a commit. Background commits happen every few seconds and a final one at shutdown,
but none on OOM or a kill, so a checkpoint whose manifest was written but not committed
can vanish. Two stores:

* :class:`ModalVolumeStore` (inside the container): a :class:`LocalStore` on the mount
  path whose ``commit()`` calls ``volume.commit()``. The checkpoint manager writes the
  manifest last and calls ``commit()`` right after, so the order is always
  "files -> manifest -> volume.commit()"; a checkpoint is reported committed only after
  ``volume.commit()`` returned. A failing commit raises :class:`StoreError` (the save is
  then not reported as committed).
* :class:`ModalVolumeReader` (outside, ``modal://VOLUME/RUN``): reads through the Volume
  API, which only ever serves committed data; read-only.

``register_mount(path, volume)`` tells :func:`trainguard.store.open_store` that paths under
``path`` live on ``volume``, so a script calling ``trainguard.Run()`` inside the container
(``TRAINGUARD_RUN_DIR`` under the mount) gets a :class:`ModalVolumeStore` unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from trainguard.errors import StoreError
from trainguard.store.base import Data, check_key
from trainguard.store.local import LocalStore
from trainguard.store.lock import FileLock

log = logging.getLogger("trainguard.store")

#: Mount path -> volume object, filled by :func:`register_mount` inside the container.
_MOUNTS: dict[str, object] = {}


def register_mount(path: str | os.PathLike, volume: object) -> None:
    """Declare that ``path`` is the mount point of ``volume`` (a ``modal.Volume``)."""
    _MOUNTS[os.path.abspath(path)] = volume


def unregister_mount(path: str | os.PathLike) -> None:
    """Forget a mount registered with :func:`register_mount`."""
    _MOUNTS.pop(os.path.abspath(path), None)


@contextlib.contextmanager
def _container_wide(name: str):
    """Hold an ``flock`` shared by every process of this container (torchrun's workers on
    one node): Modal does not document concurrent ``commit()``s of one volume from
    several processes, so they take turns."""
    import fcntl

    folder = Path(tempfile.gettempdir(), "trainguard-locks")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def store_for_path(path: str | os.PathLike) -> ModalVolumeStore | None:
    """A :class:`ModalVolumeStore` when ``path`` is under a registered mount, else None."""
    full = os.path.abspath(path)
    for mount, volume in _MOUNTS.items():
        if full == mount or full.startswith(mount.rstrip("/") + "/"):
            return ModalVolumeStore(full, volume)
    return None


class ModalVolumeStore(LocalStore):
    """A run directory on a mounted Modal Volume.

    Args:
        root: the run directory, under the volume's mount path.
        volume: the ``modal.Volume`` mounted there (anything with ``commit()``; tests
            pass a recording fake).
        **options: passed to :class:`LocalStore`.
    """

    def __init__(self, root: str | os.PathLike, volume: object, **options) -> None:
        super().__init__(root, **options)
        self.volume = volume
        self.commits = 0

    def __repr__(self) -> str:
        return f"ModalVolumeStore({self.url!r})"

    def commit(self) -> None:
        """Persist everything written so far: ``volume.commit()``.

        Raises:
            StoreError: the commit failed; what was written is not durable yet.
        """
        try:
            with _container_wide("volume-commit"):  # e.g. torchrun's 8 workers
                self.volume.commit()
        except Exception as exc:
            raise StoreError(f"volume.commit() of {self.url} failed: {exc}; the last "
                             "checkpoint is not durable (the previous one still is)") from exc
        self.commits += 1

    def refresh(self) -> None:
        """See what other containers committed: ``volume.reload()``. A container sees
        other containers' commits only after it reloads (nodes of a cluster included).

        Raises:
            StoreError: the reload failed (Modal refuses it while files are open).
        """
        reload = getattr(self.volume, "reload", None)
        if reload is None:
            return
        try:
            reload()
        except Exception as exc:
            raise StoreError(f"volume.reload() of {self.url} failed: {exc}") from exc

    def lock(self, name: str, purpose: str = "writer") -> FileLock:
        """A container-local writer lock.

        ``flock`` does not reach across containers on a Volume, and a preempted container
        never releases a lock file it wrote there; Modal runs one attempt of an input at
        a time, so the lock only has to exclude writers inside this container.
        """
        key = check_key(name).replace("/", "_")
        local = Path(tempfile.gettempdir(), "trainguard-locks",
                     hashlib.sha1(self.url.encode()).hexdigest()[:16] + "-" + key)
        local.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(local, purpose=purpose)


class ModalVolumeReader:
    """Read a run directory through the Modal Volume API (``modal://VOLUME/RUN``).

    Only committed data is visible through the API, so a checkpoint whose manifest is
    listed here has been committed. Read-only: writing and deleting raise, committing does
    nothing. The last file read is cached until :meth:`refresh`.

    Args:
        url: ``modal://VOLUME/PATH``.
        volume: the volume object (default ``modal.Volume.from_name(VOLUME)``); anything
            with ``listdir(path, recursive=)`` and ``read_file(path)``.
    """

    def __init__(self, url: str, volume: object | None = None) -> None:
        name, prefix = parse_modal_url(url)
        self._url, self.prefix = url, prefix
        if volume is None:
            import modal

            volume = modal.Volume.from_name(name)
        self.volume = volume
        self._cache: tuple[str, bytes] | None = None

    @property
    def url(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"ModalVolumeReader({self._url!r})"

    def _path(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def _entries(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.prefix or "/"
        try:
            entries = self.volume.listdir(base, recursive=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            if type(exc).__name__ == "NotFoundError":
                return {}
            raise StoreError(f"cannot list {self._url}/{prefix}: {exc}") from exc
        cut = len(self.prefix.strip("/")) + 1 if self.prefix.strip("/") else 0
        return {e.path.strip("/")[cut:]: e.size for e in entries if int(e.type) == 1}

    def list(self, prefix: str = "") -> list[str]:
        """Every committed key under ``prefix``, sorted."""
        return sorted(self._entries(prefix))

    def exists(self, key: str) -> bool:
        return key in self._entries(check_key(key))  # "" would list the whole run

    def size(self, key: str) -> int:
        entries = self._entries(check_key(key))
        if key not in entries:
            raise FileNotFoundError(f"{self._url}/{key}")
        return entries[key]

    def read(self, key: str, offset: int = 0, length: int | None = None) -> memoryview:
        """Read (part of) a committed file; the last file read is cached until
        :meth:`refresh` (a restore reads one file's ranges from two threads).

        Raises:
            FileNotFoundError: ``key`` is not committed.
            ValueError: a malformed key, or a negative offset or length.
        """
        path = self._path(key)  # a bad key is the caller's ValueError, not a StoreError
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length} for {key!r}")
        cached = self._cache  # one read of the attribute: restore reads from two threads
        if cached is not None and cached[0] == key:
            data = cached[1]
        else:
            try:
                data = b"".join(self.volume.read_file(path))
            except FileNotFoundError:
                raise
            except Exception as exc:
                if type(exc).__name__ == "NotFoundError":
                    raise FileNotFoundError(f"{self._url}/{key}") from exc
                raise StoreError(f"cannot read {self._url}/{key}: {exc}") from exc
            self._cache = (key, data)
        end = len(data) if length is None else offset + length
        return memoryview(data)[offset:end]

    def refresh(self) -> None:
        """Forget the cached file: the next read sees what was committed since.

        Listing, ``exists`` and ``size`` always ask the volume; only ``read`` of the file
        read last can be stale until this is called.
        """
        self._cache = None

    def write(self, key: str, data: Data) -> int:
        raise StoreError(f"{self._url} is read-only from outside Modal; write to a directory "
                         "or bucket instead (e.g. `trainguard sync modal://... ./local`)")

    def delete(self, key: str) -> None:
        self.write(key, b"")

    def commit(self) -> None:
        """Nothing to commit: this store is read-only."""


def parse_modal_url(url: str) -> tuple[str, str]:
    """``modal://VOLUME/runs/exp1`` -> ``("VOLUME", "runs/exp1")``.

    Raises:
        ValueError: not a ``modal://VOLUME[/PATH]`` URL.
    """
    scheme, _, rest = url.partition("://")
    name, _, path = rest.partition("/")
    if scheme != "modal" or not name:
        raise ValueError(f"{url!r} is not a Modal volume URL; use modal://VOLUME/PATH")
    return name, path.strip("/")
