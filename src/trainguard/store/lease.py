"""A single-writer lease on a run directory in an object store.

Object stores have no ``flock``; they do have conditional PUTs (S3 since 2024, GCS, Azure,
R2, MinIO): create-if-absent, and overwrite-if-the-ETag-still-matches. The lease is one
small JSON object taken with create-if-absent and renewed in the background every
``ttl / 4`` seconds with overwrite-if-unchanged, so two writers can never both believe
they hold it.

A holder that dies stops renewing. Clocks of different machines are never compared: a
newcomer that finds the lease taken watches it on its *own* clock, and

* if the lease object changes (its holder renewed it), the holder is alive: refused
  with :class:`LockHeld` naming it;
* if it stays unchanged for ``ttl`` seconds, the holder is gone: taken over, again with
  overwrite-if-unchanged (of two newcomers racing, one wins);
* if the holder ran on this very host and its pid is gone, it is taken over at once.

So a restarted attempt after preemption waits at most ``ttl`` (default 60 s) for its
dead predecessor's lease. A holder whose renewal finds the lease no longer its own has
lost it (it was unreachable, or frozen, for longer than ``ttl``); its next :meth:`acquire`
raises :class:`LockHeld` instead of writing beside the new holder, and so does
:meth:`confirm`, which a save calls right before publishing its manifest and retention
right before deleting: it renews on the spot, so a holder that was frozen finds out then,
however long ago its background renewal last ran.

A renewal whose precondition fails is not taken at its word: if obstore sent the PUT
again because the answer to the first was lost, the first may have landed and changed
the ETag. The lease is read back; if it still carries this holder's id, nobody took it
over (a newcomer writes its own id), and the renewal counts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from trainguard.errors import LockHeld, StoreError
from trainguard.store.lock import pid_alive
from trainguard.store.retry import Backoff

log = logging.getLogger("trainguard.store")

DEFAULT_TTL = 60.0


class ObjectLease:
    """The lease at ``path`` in an obstore store (see the module docs).

    Args:
        obstore: the obstore module.
        store: the obstore store object.
        path: the lease object's path in the bucket.
        url: the run directory's URL, for messages.
        ttl: seconds without renewal after which a holder counts as gone.
        purpose: what the holder does, for messages.
        retry: the backoff for :meth:`acquire` and :meth:`confirm` through an outage
            (the background renewal just tries again a quarter ttl later).
    """

    def __init__(self, obstore: Any, store: Any, path: str, url: str, *,
                 ttl: float = DEFAULT_TTL, purpose: str = "writer",
                 retry: Backoff | None = None) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl!r}")
        self._obs, self._store, self._path, self.url = obstore, store, path, url
        self.ttl, self.purpose = ttl, purpose
        self._retry = retry if retry is not None else Backoff()
        self._id = uuid.uuid4().hex
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lock = threading.Lock()  # one conditional PUT of ours at a time

    @property
    def held(self) -> bool:
        """Whether this object holds the lease (as of its last renewal)."""
        return self._etag is not None and self._lost is None

    def _record(self) -> bytes:
        return json.dumps({"holder": self._id, "pid": os.getpid(),
                           "host": socket.gethostname(), "since": time.time(),
                           "purpose": self.purpose, "ttl": self.ttl}).encode()

    def _read(self) -> tuple[dict, str] | None:
        """(record, etag) of the lease object, None when there is none."""
        try:
            result = self._obs.get(self._store, self._path)
            data = bytes(result.bytes())
            etag = result.meta["e_tag"]
        except Exception as exc:
            if type(exc).__name__ == "NotFoundError" or isinstance(exc, FileNotFoundError):
                return None
            raise StoreError(f"cannot read the lease {self.url}/{self._path_name}: {exc}") \
                from exc
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), etag

    @property
    def _path_name(self) -> str:
        return self._path.rsplit("/", 1)[-1]

    def _put(self, mode: Any) -> str | None:
        """A conditional PUT of our record; its new ETag, or None when the condition failed."""
        try:
            result = self._obs.put(self._store, self._path, self._record(), mode=mode,
                                   use_multipart=False)
        except Exception as exc:
            # NotFoundError: an If-Match on a lease that was deleted (some stores say 404)
            if type(exc).__name__ in ("AlreadyExistsError", "PreconditionError",
                                      "NotFoundError"):
                return None
            raise StoreError(f"cannot write the lease {self.url}/{self._path_name}: {exc}") \
                from exc
        return result["e_tag"]

    def _refuse(self, record: dict) -> LockHeld:
        who = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
        return LockHeld(
            f"{self.url} is leased by another {record.get('purpose', 'writer')} ({who}), which "
            f"renews its lease: only one process may write a run directory. Stop that "
            f"process; a holder that dies loses the lease {self.ttl:.0f} s after its last "
            f"renewal.")

    def acquire(self) -> ObjectLease:
        """Take the lease, waiting up to ``ttl`` for a holder that stopped renewing.

        Raises:
            LockHeld: a live holder renews it, or this object lost it.
        """
        if self._lost is not None:
            raise LockHeld(self._lost)
        if self._etag is not None:
            return self
        deadline = None
        seen: tuple[dict, str] | None = None
        what = f"cannot take the writer lease of {self.url}"
        while True:
            etag = self._retry.call(lambda: self._put("create"), what)
            if etag is not None:
                break
            current = self._retry.call(self._read, what)
            if current is None:
                continue  # released between our PUT and our GET: try again
            record, current_etag = current
            if record.get("holder") == self._id:  # our own, from an earlier acquire
                etag = current_etag
                break
            if seen is not None and current_etag != seen[1]:
                raise self._refuse(record)  # it changed while we watched: renewed
            if seen is None:
                seen = current
                deadline = time.monotonic() + self.ttl
                if not self._holder_dead_here(record):
                    log.warning("%s: the writer lease of pid %s on host %s exists; waiting up "
                                "to %.0f s for it to be renewed or to expire", self.url,
                                record.get("pid", "?"), record.get("host", "?"), self.ttl)
            if self._holder_dead_here(record) or time.monotonic() >= deadline:
                etag = self._retry.call(lambda tag=current_etag: self._put({"e_tag": tag}), what)
                if etag is not None:
                    log.warning("%s: took over the writer lease of pid %s on host %s (%s)",
                                self.url, record.get("pid", "?"), record.get("host", "?"),
                                "process gone" if self._holder_dead_here(record)
                                else f"not renewed for {self.ttl:.0f} s")
                    break
                seen = None  # someone else took it first: watch the new holder
                continue
            time.sleep(min(1.0, self.ttl / 8))
        self._etag = etag
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                         name="trainguard-lease")
        self._renewer.start()
        return self

    @staticmethod
    def _holder_dead_here(record: dict) -> bool:
        pid = record.get("pid")
        return (record.get("host") == socket.gethostname() and isinstance(pid, int)
                and pid != os.getpid() and not pid_alive(pid))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except StoreError as exc:  # unreachable for a while: keep trying until ttl
                log.warning("%s: could not renew the writer lease: %s", self.url, exc)
            if self._lost is not None:
                return

    def renew(self) -> bool:
        """Renew now; False (and the lease counts as lost) when it is no longer ours.

        Raises:
            StoreError: the store could not be reached; nothing is decided.
        """
        with self._lock:
            if self._etag is None or self._lost is not None:
                return False
            etag = self._put({"e_tag": self._etag})
            if etag is None:  # maybe our own PUT landed and only its answer was lost
                current = self._read()
                if current is not None and current[0].get("holder") == self._id:
                    etag = current[1]
            if etag is None:
                self._lost = (f"{self.url}: this process lost its writer lease (another "
                              f"process took it over after it went unrenewed for "
                              f"{self.ttl:.0f} s, or it was deleted); it must not write "
                              f"there any more")
                log.error("%s", self._lost)
                return False
            self._etag = etag
            return True

    def confirm(self) -> ObjectLease:
        """Renew now, through an outage if need be, and raise unless the lease is ours.

        Called right before a checkpoint is published and before retention deletes: a
        holder frozen past the ttl finds out here, not after it wrote.

        Raises:
            LockHeld: the lease was lost (or never taken).
            StoreError: the store stayed unreachable for the whole retry budget.
        """
        if self._lost is None and self._etag is None:
            raise LockHeld(f"{self.url}: this process does not hold the writer lease; take "
                           f"it (acquire) before writing")
        if not self._retry.call(self.renew, f"cannot renew the writer lease of {self.url}"):
            raise LockHeld(self._lost)
        return self

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._renewer = None
        with self._lock:
            if self._etag is not None and self._lost is None:
                current = self._read()
                if current is not None and current[1] == self._etag:
                    try:
                        self._obs.delete(self._store, self._path)
                    except Exception as exc:  # it expires anyway
                        log.warning("%s: could not delete the writer lease: %s", self.url, exc)
            self._etag = None

    def __enter__(self) -> ObjectLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
