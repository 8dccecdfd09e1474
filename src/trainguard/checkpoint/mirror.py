"""Two tiers: save to fast local disk, then upload each committed checkpoint to a remote
store (a bucket) in the background.

The remote copy counts only once its manifest has landed there: the uploader copies a
checkpoint's files (and any earlier files an incremental checkpoint refers to) first and
its manifest last, so a reader of the bucket never sees a half-uploaded checkpoint.
A failing upload is retried with exponential backoff, forever, in its own thread; it
never blocks training. When uploads fall behind, only the newest committed checkpoint is
uploaded (older ones are superseded). So the uploader writes through a view of the
remote store without the store's own retry budget (``ObjectStore.with_retry``): waiting
out an outage inside one upload would only keep it on a checkpoint that a newer one has
superseded meanwhile. The remote tier gets the same retention policy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from trainguard.checkpoint import commit
from trainguard.checkpoint.format import (
    MANIFEST,
    RETIRED,
    FileEntry,
    Manifest,
    checksum,
    step_dir,
)
from trainguard.errors import CheckpointCorrupt
from trainguard.store.base import Retrying, Store
from trainguard.store.retry import Backoff

log = logging.getLogger("trainguard.mirror")


class Mirror:
    """Background uploader of committed checkpoints from ``primary`` to ``remote``.

    Args:
        primary: the store checkpoints are committed to first (local disk).
        remote: the store they are copied to (a bucket).
        after_upload: called with the step after each successful upload (retention).
        initial_delay: first retry delay in seconds; doubles up to ``max_delay``.
        sleep: injectable for tests.
    """

    def __init__(self, primary: Store, remote: Store, *,
                 after_upload: Callable[[int], None] | None = None,
                 initial_delay: float = 1.0, max_delay: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.primary, self.remote = primary, remote
        # retries are this class's own: the store's budget would only delay the next upload
        self._dest = remote.with_retry(Backoff(budget=0.0)) if isinstance(remote, Retrying) \
            else remote
        self.after_upload = after_upload
        self.initial_delay, self.max_delay = initial_delay, max_delay
        self._sleep = sleep
        self._cond = threading.Condition()
        self._pending: int | None = None  # newest committed step not yet uploaded
        self._busy = False
        self._closed = False
        #: newest step whose manifest landed on the remote (None before the first).
        self.uploaded_step: int | None = None
        #: the last upload error (kept until an upload succeeds).
        self.last_error: BaseException | None = None
        # key -> checksum of files this process uploaded. Only these are skipped: an object
        # left on the remote by someone else may hold other bytes under the same name.
        self._sent: dict[str, str] = {}
        self._thread = threading.Thread(target=self._loop, name="trainguard-mirror", daemon=True)
        self._thread.start()

    def enqueue(self, step: int) -> None:
        """Ask for ``step`` (just committed on the primary) to be uploaded."""
        with self._cond:
            if self._pending is None or step > self._pending:
                self._pending = step
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending; False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Drain (up to ``timeout``), then stop the thread. Returns whether it drained."""
        drained = self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return drained

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed and self._pending is None:
                    return
                step, self._pending, self._busy = self._pending, None, True
            try:
                self._upload_with_retries(step)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload_with_retries(self, step: int) -> None:
        delay = self.initial_delay
        while True:
            try:
                if self._upload(step):
                    self.uploaded_step = step if self.uploaded_step is None \
                        else max(step, self.uploaded_step)
                    self.last_error = None
                    if self.after_upload is not None:
                        self.after_upload(step)
                return
            except Exception as exc:  # logged, retried; never kills the thread
                self.last_error = exc
                with self._cond:
                    if self._closed or (self._pending is not None and self._pending > step):
                        return  # superseded by a newer checkpoint, or shutting down
                log.warning("upload of step %d to %s failed (%r); retrying in %.1f s",
                            step, self.remote.url, exc, delay)
                self._sleep(delay)
                delay = min(self.max_delay, delay * 2)

    def _upload(self, step: int) -> bool:
        """Copy one committed checkpoint, manifest last. False if it vanished locally."""
        started = time.monotonic()
        if copy_checkpoint(self.primary, self._dest, step, self._sent) is None:
            log.info("step %d was deleted locally before its upload; skipped", step)
            return False
        log.info("uploaded step %d to %s (%.1f s)", step, self.remote.url,
                 time.monotonic() - started)
        return True


def copy_checkpoint(source: Store, dest: Store, step: int,
                    sent: dict[str, str] | None = None) -> Manifest | None:
    """Copy the committed checkpoint ``step`` from ``source`` to ``dest``, manifest last,
    so that it appears at ``dest`` whole or not at all. Returns its manifest, or None when
    ``source`` lost it (deleted by retention) before or during the copy.

    Args:
        sent: key -> checksum of files already copied by this process; they are skipped
            (an object someone else left at ``dest`` may hold other bytes: never trusted).
    """
    sent = {} if sent is None else sent
    key = step_dir(step)
    try:
        raw = source.read(f"{key}/{MANIFEST}")
    except FileNotFoundError:
        return None
    manifest = Manifest.from_bytes(raw, f"{key}/{MANIFEST}")
    pieces = [(f"{key}/{name}", entry) for name, entry in manifest.files.items()]
    pieces += [(ref.key, FileEntry(ref.size, ref.checksum)) for ref in manifest.refs]
    for file_key, entry in pieces:
        if sent.get(file_key) == entry.checksum:
            continue
        try:
            data = source.read(file_key)
        except FileNotFoundError:
            return None
        if len(data) != entry.size or checksum(data) != entry.checksum:
            # Never spread bad bytes: the copy would look committed at the destination.
            raise CheckpointCorrupt(f"{source.url}/{file_key} does not match its manifest; "
                                    f"not copied")
        dest.write(file_key, data)
        sent[file_key] = entry.checksum
    for ref_step in {ref.step for ref in manifest.refs}:
        ref_dir = step_dir(ref_step)
        if not dest.exists(f"{ref_dir}/{MANIFEST}") and not dest.exists(f"{ref_dir}/{RETIRED}"):
            # Only shared files live there: mark it, or readers would call it interrupted.
            commit.retire(dest, ref_step, "referenced files")
    # The manifest goes last: only now does the copy exist for readers. It replaces a
    # copy of the same checkpoint an earlier process uploaded (whose files stay: their
    # names are that save's own).
    commit.publish(dest, raw, step, replace=True)
    return manifest
