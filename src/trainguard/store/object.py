"""``ObjectStore``: checkpoints in S3, GCS, Azure, R2 or MinIO, through obstore.

Addressed by URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``) and configured by
the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_...``).

Object stores have no atomic rename, but a PUT is atomic per object: readers see the old
object, nothing, or the whole new one. That is all the checkpoint layer needs, because
it commits a checkpoint by writing its manifest *last*: a checkpoint whose manifest has
not landed does not exist. The manifest is published with :meth:`ObjectStore.create`,
a conditional PUT (``If-None-Match: *``) that never replaces an object. Large objects are
uploaded as parallel multipart uploads and read back with parallel ranged GETs.

Transient errors (5xx, throttling, dropped connections, timeouts) are retried twice over:
obstore retries each request a few times within seconds, and every operation of this
store is retried with exponential backoff and jitter for up to ``TRAINGUARD_RETRY_BUDGET``
seconds (default two minutes; see :mod:`trainguard.store.retry`), so a short endpoint
outage delays a save instead of failing it. A write whose data is a one-shot iterator
(a generator) cannot be sent twice and gets obstore's retries only; buffers, lists and
re-iterable streams (what the checkpoint manager passes) get both.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlparse

from trainguard.errors import StoreError
from trainguard.store.base import Data, check_key
from trainguard.store.lease import DEFAULT_TTL, ObjectLease
from trainguard.store.local import _chunks
from trainguard.store.retry import DEFAULT_BUDGET, Backoff

BUDGET_ENV = "TRAINGUARD_RETRY_BUDGET"

SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "r2")
_PART = 16 << 20  # multipart part size and ranged-read size


def _import_obstore():
    try:
        import obstore
    except ImportError as exc:  # the extra is optional
        raise StoreError("object-store URLs need the 's3' extra: pip install 'trainguard[s3]'") \
            from exc
    return obstore


def _retry_config(max_retries: int, retry_timeout: float) -> dict:
    return {"max_retries": max_retries, "retry_timeout": timedelta(seconds=retry_timeout),
            "backoff": {"init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=15), "base": 2.0}}


def _default_backoff() -> Backoff:
    raw = os.environ.get(BUDGET_ENV, "")
    try:
        budget = float(raw) if raw else DEFAULT_BUDGET
        return Backoff(budget=budget)
    except ValueError:
        raise StoreError(f"{BUDGET_ENV}={raw!r} is not a number of seconds (the default is "
                         f"{DEFAULT_BUDGET:.0f})") from None


class ObjectStore:
    """A store under a bucket prefix of an object store.

    Args:
        url: ``s3://bucket/prefix`` (or ``gs://``, ``az://``...).
        max_retries: obstore's own quick retries of one request on transient errors.
        retry_timeout: obstore gives up its quick retries of one request after this long.
        concurrency: parallel parts per upload and ranged reads per download.
        client_options: extra obstore client options (e.g. ``{"timeout": "60s"}``).
        retry: the backoff around every operation (default: :class:`Backoff` with the
            budget ``TRAINGUARD_RETRY_BUDGET`` seconds, else two minutes).

    Raises:
        ValueError: not an object-store URL.
        StoreError: the client cannot be configured, or ``TRAINGUARD_RETRY_BUDGET`` is
            not a number.
    """

    def __init__(self, url: str, *, max_retries: int = 3, retry_timeout: float = 10.0,
                 concurrency: int = 8, client_options: dict | None = None,
                 retry: Backoff | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in SCHEMES or not parsed.netloc:
            raise ValueError(f"{url!r} is not an object-store URL like s3://bucket/prefix")
        self._url = url.rstrip("/")
        self._prefix = parsed.path.strip("/")
        self.concurrency = concurrency
        self.retry = retry if retry is not None else _default_backoff()
        obstore = _import_obstore()
        from obstore.store import from_url

        options = dict(client_options or {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint.startswith("http://"):
            options.setdefault("allow_http", True)  # a local MinIO / test server
        bucket_url = f"{parsed.scheme}://{parsed.netloc}"
        kwargs = {"endpoint": endpoint} if endpoint and parsed.scheme in ("s3", "s3a") else {}
        try:
            self._store = from_url(bucket_url, client_options=options,
                                   retry_config=_retry_config(max_retries, retry_timeout),
                                   **kwargs)
        except Exception as exc:
            raise StoreError(f"cannot configure {url}: {exc}") from exc
        self._obs = obstore
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="trainguard-object")

    @property
    def url(self) -> str:
        """The store's URL (bucket and prefix)."""
        return self._url

    def __repr__(self) -> str:
        return f"ObjectStore({self._url!r})"

    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _error(self, action: str, key: str, exc: Exception) -> Exception:
        if isinstance(exc, FileNotFoundError) or type(exc).__name__ == "NotFoundError":
            return FileNotFoundError(f"{self._url}/{key} does not exist")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return StoreError(f"cannot {action} {self._url}/{key}: {first_line[:300]}")

    def with_retry(self, retry: Backoff) -> ObjectStore:
        """This store with another backoff: the same client and connection pool.

        The two-tier uploader uses ``Backoff(budget=0)``: it retries on its own, forever,
        and must be free to skip to a newer checkpoint instead of waiting on an old one.
        """
        view = copy.copy(self)
        view.retry = retry
        return view

    def _call(self, action: str, key: str, operation: Callable, *, retry: bool = True):
        """Run one operation with the backoff; errors translated at this boundary."""
        try:
            if not retry:
                return operation()
            return self.retry.call(operation, f"cannot {action} {self._url}/{key}")
        except (StoreError, FileExistsError):
            raise
        except Exception as exc:
            raise self._error(action, key, exc) from exc

    def write(self, key: str, data: Data) -> int:
        """Upload ``data`` at ``key`` (multipart above 16 MiB); atomic per object.

        Retried within the budget unless ``data`` is a one-shot iterator (see the module
        docs).
        """
        path = self._path(key)

        def attempt() -> int:
            total = 0

            def counted() -> Iterator[memoryview]:
                nonlocal total
                for view in _chunks(data):
                    total += len(view)
                    yield view

            parts = _rechunk(counted(), _PART)
            first = next(parts)
            if len(first) < _PART:  # the whole object: one plain PUT, no multipart
                self._obs.put(self._store, path, first, use_multipart=False)
            else:
                self._obs.put(self._store, path, itertools.chain([first], parts),
                              chunk_size=_PART, max_concurrency=self.concurrency)
            return total

        return self._call("write", key, attempt, retry=not isinstance(data, Iterator))

    def create(self, key: str, data: Data) -> int:
        """Upload ``data`` at ``key`` only if no object is there (``If-None-Match: *``).

        A request whose answer was lost and is sent again finds its own object: an object
        holding exactly ``data`` counts as this call's, any other as someone else's.

        Raises:
            FileExistsError: another object is at ``key``; it is left as it is.
        """
        path = self._path(key)
        payload = b"".join(bytes(view) for view in _chunks(data))

        def attempt() -> int:
            try:
                self._obs.put(self._store, path, payload, mode="create", use_multipart=False)
            except Exception as exc:
                if type(exc).__name__ != "AlreadyExistsError":
                    raise
                if bytes(self._obs.get(self._store, path).bytes()) != payload:
                    raise FileExistsError(f"{self._url}/{key} exists already; not "
                                          f"overwritten") from None
            return len(payload)

        return self._call("create", key, attempt)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> memoryview:
        """Read a byte range; large reads are split into parallel ranged GETs."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length} for {key!r}")
        path = self._path(key)
        size = self.size(key)
        end = size if length is None else min(size, offset + length)
        if end <= offset:
            return memoryview(b"")
        out = bytearray(end - offset)
        view = memoryview(out)

        def fetch(start: int) -> None:
            stop = min(end, start + _PART)
            chunk = self._call("read", key, lambda: self._obs.get_range(
                self._store, path, start=start, end=stop))
            view[start - offset:stop - offset] = memoryview(chunk)

        for future in [self._pool.submit(fetch, s) for s in range(offset, end, _PART)]:
            future.result()
        return view

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes."""
        path = self._path(key)
        return self._call("stat", key, lambda: int(self._obs.head(self._store, path)["size"]))

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self.size(key)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive, sorted)."""
        clean = prefix.strip("/")
        if clean:
            check_key(clean)
        full = "/".join(p for p in (self._prefix, clean) if p)
        strip = len(self._prefix) + 1 if self._prefix else 0

        def listing() -> list[str]:
            return [meta["path"][strip:] for batch in
                    self._obs.list(self._store, prefix=full or None) for meta in batch]

        # obstore's prefix is a path prefix ("d" matches "d/x", not "de"): same as LocalStore.
        return sorted(self._call("list", prefix or "/", listing))

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
        path = self._path(key)
        try:
            self._call("delete", key, lambda: self._obs.delete(self._store, path))
        except FileNotFoundError:
            pass

    def commit(self) -> None:
        """Nothing to do: an acknowledged PUT is durable and visible to every reader."""

    def lock(self, name: str, purpose: str = "writer") -> ObjectLease:
        """A writer lease on the object ``name`` (not yet acquired): conditional PUTs,
        renewed in the background; ``TRAINGUARD_LEASE_TTL`` seconds (default 60) without
        renewal free it. See :mod:`trainguard.store.lease`."""
        raw = os.environ.get("TRAINGUARD_LEASE_TTL", "")
        try:
            ttl = float(raw) if raw else DEFAULT_TTL
        except ValueError:
            raise StoreError(f"TRAINGUARD_LEASE_TTL={raw!r} is not a number of seconds") \
                from None
        return ObjectLease(self._obs, self._store, self._path(name), self._url, ttl=ttl,
                           purpose=purpose, retry=self.retry)


def _rechunk(chunks: Iterator[memoryview], size: int) -> Iterator[bytes]:
    """Regroup a stream into parts of ``size`` bytes (S3 parts must be >= 5 MiB)."""
    buf = bytearray()
    sent = False
    for view in chunks:
        buf += view
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
            sent = True
    if buf or not sent:
        yield bytes(buf)
