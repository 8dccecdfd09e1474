"""``ObjectStore``: checkpoints in S3, GCS, Azure, R2 or MinIO, through obstore.

Addressed by URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``) and configured by
the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_...``).

Object stores have no atomic rename, but a PUT is atomic per object: readers see the old
object, nothing, or the whole new one. That is all the checkpoint layer needs, because
it commits a checkpoint by writing its manifest *last*: a checkpoint whose manifest has
not landed does not exist. Large objects are uploaded as parallel multipart uploads and
read back with parallel ranged GETs; transient errors (5xx, dropped connections,
timeouts) are retried with exponential backoff by obstore's retry layer.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlparse

from trainguard.errors import StoreError
from trainguard.store.base import Data, check_key
from trainguard.store.lease import DEFAULT_TTL, ObjectLease
from trainguard.store.local import _chunks

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


class ObjectStore:
    """A store under a bucket prefix of an object store.

    Args:
        url: ``s3://bucket/prefix`` (or ``gs://``, ``az://``...).
        max_retries: retries of one request on transient errors.
        retry_timeout: give up retrying one request after this many seconds.
        concurrency: parallel parts per upload and ranged reads per download.
        client_options: extra obstore client options (e.g. ``{"timeout": "60s"}``).
    """

    def __init__(self, url: str, *, max_retries: int = 10, retry_timeout: float = 180.0,
                 concurrency: int = 8, client_options: dict | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in SCHEMES or not parsed.netloc:
            raise ValueError(f"{url!r} is not an object-store URL like s3://bucket/prefix")
        self._url = url.rstrip("/")
        self._prefix = parsed.path.strip("/")
        self.concurrency = concurrency
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

    def write(self, key: str, data: Data) -> int:
        """Upload ``data`` at ``key`` (multipart above 16 MiB); atomic per object."""
        path = self._path(key)
        total = 0

        def counted() -> Iterator[memoryview]:
            nonlocal total
            for view in _chunks(data):
                total += len(view)
                yield view

        parts = _rechunk(counted(), _PART)
        first = next(parts)
        try:
            if len(first) < _PART:  # the whole object: one plain PUT, no multipart
                self._obs.put(self._store, path, first, use_multipart=False)
            else:
                self._obs.put(self._store, path, itertools.chain([first], parts),
                              chunk_size=_PART, max_concurrency=self.concurrency)
        except Exception as exc:
            raise self._error("write", key, exc) from exc
        return total

    def read(self, key: str, offset: int = 0, length: int | None = None) -> memoryview:
        """Read a byte range; large reads are split into parallel ranged GETs."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length} for {key!r}")
        path = self._path(key)
        try:
            size = self.size(key)
            end = size if length is None else min(size, offset + length)
            if end <= offset:
                return memoryview(b"")
            starts = list(range(offset, end, _PART))
            out = bytearray(end - offset)
            view = memoryview(out)

            def fetch(start: int) -> None:
                stop = min(end, start + _PART)
                chunk = self._obs.get_range(self._store, path, start=start, end=stop)
                view[start - offset:stop - offset] = memoryview(chunk)

            for future in [self._pool.submit(fetch, s) for s in starts]:
                future.result()
            return view
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._error("read", key, exc) from exc

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes."""
        try:
            return int(self._obs.head(self._store, self._path(key))["size"])
        except Exception as exc:
            raise self._error("stat", key, exc) from exc

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
        try:
            keys = [meta["path"][strip:] for batch in self._obs.list(self._store, prefix=full or None)
                    for meta in batch]
        except Exception as exc:
            raise self._error("list", prefix or "/", exc) from exc
        # obstore's prefix is a path prefix ("d" matches "d/x", not "de"): same as LocalStore.
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
        try:
            self._obs.delete(self._store, self._path(key))
        except Exception as exc:
            err = self._error("delete", key, exc)
            if not isinstance(err, FileNotFoundError):
                raise err from exc

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
                           purpose=purpose)


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
