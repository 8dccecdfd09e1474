"""``LocalStore``: the embedded default, a directory on a local (or mounted) filesystem.

Durability invariant: when ``write`` returns, the object is complete on disk under its
final name. Each write goes to a temp sibling (``.tgtmp-*``), is fsync'd, is renamed into
place with ``os.replace`` (atomic on POSIX), and the directory is fsync'd so the rename
itself survives a power cut. ``commit`` therefore has nothing left to do.

Links and special files: trainguard never makes a symbolic link, FIFO or device inside a
store, so one found there was planted. A key whose path crosses a link below the root is
refused (:class:`~trainguard.errors.UnsafePath`) for every operation but ``delete`` (which
removes the link itself, never its target); files are opened with ``O_NOFOLLOW`` and,
for reading, ``O_NONBLOCK`` (a FIFO would block the open), and anything that is not a
regular file is refused before a byte of it is read. The root itself may be a link: it is
the user's choice of where the store lives.

Speed: large writes stream through page-aligned staging buffers with ``O_DIRECT`` (when
the filesystem allows it); two full buffers are written at once, each at its own offset,
while the next one fills, so copying overlaps writing. The staging buffers sit on
transparent huge pages: an O_DIRECT request holds at most ``max_segments`` physically
contiguous pieces of memory, so from scattered 4 KiB pages a request carries ~0.5-1.6
MiB, from huge pages the device's limit (4 MiB on the VM's virtio disk), and the disk
takes ~4 MiB requests about twice as fast (``bench/write_path.py``). On this class of
disk a buffered write + fsync runs at less than half the ``O_DIRECT`` speed. Large
whole-file reads use ``O_DIRECT`` too, into private (not shmem) memory.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainguard.errors import StoreError, UnsafePath
from trainguard.store.base import Data, check_key
from trainguard.store.lock import FileLock
from trainguard.store.paths import CLOEXEC, NOFOLLOW, link_refused, open_regular, special_refused

TMP_PREFIX = ".tgtmp-"
_ALIGN = 4096
_DIRECT_MIN_BYTES = 1 << 20  # below this, O_DIRECT buys nothing
# O_DIRECT chunk reads in flight per store (H100 host, 19.3 GB cold: 4 -> 14.1 s, 16 -> 12.4 s)
_READ_DEPTH = 16
_WRITE_DEPTH = 2  # staging buffers written at once per file


def _chunks(data: Data) -> Iterator[memoryview]:
    """Yield ``data`` as byte-level memoryviews, whether it is one buffer or many."""
    try:
        yield memoryview(data).cast("B")  # type: ignore[arg-type]
        return
    except TypeError:
        pass
    for piece in data:  # type: ignore[union-attr]
        view = memoryview(piece)
        yield view if view.format == "B" and view.ndim == 1 else view.cast("B")


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _enable_direct(fd: int) -> bool:
    """Switch an open fd to O_DIRECT; False when the filesystem refuses (tmpfs...)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        return True
    except OSError:
        return False


def _link_exclusive(tmp: Path, final: Path) -> bool:
    """Give ``tmp``'s file the name ``final`` unless that name exists (FileExistsError).

    Returns:
        True when ``tmp`` still names the file too (a hard link was made).
    """
    try:
        os.link(tmp, final, follow_symlinks=False)
        return True
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS,
                             errno.EXDEV, errno.EMLINK):
            raise
    if os.path.lexists(final):  # no hard links on this filesystem: check, then rename
        raise FileExistsError(errno.EEXIST, "exists", str(final))
    os.rename(tmp, final)
    return False


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def private_buffer(nbytes: int, huge: bool = False) -> mmap.mmap:
    """``nbytes`` of page-aligned anonymous memory, private to the process.

    Private, not ``mmap.mmap(-1, n)``'s default shared mapping: shared anonymous memory
    is shmem, whose pages fault in about twice as slowly (measured on the 2-core VM:
    0.4-1.4 s vs 0.23-0.46 s per GB). ``huge`` asks for transparent huge pages: an
    O_DIRECT request can carry at most ``max_segments`` physically contiguous runs of
    memory (254 on a virtio disk), so from scattered 4 KiB pages requests stay near
    1 MiB, and from huge pages they reach the device's 4 MiB limit (measured on the VM:
    1 GB written from 4 KiB staging pages in 0.60-0.69 s at 0.5-0.65 MiB per request,
    from huge ones in 0.28 s at 3.9 MiB). Faulting huge pages in costs more (~1.7 s per
    GB on the VM), so only buffers that are reused get them.
    """
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


class _BufferPool:
    """Page-aligned anonymous mmaps, allocated once and reused across writes and reads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return private_buffer(self.size, huge=True)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buf)


class _StreamWriter:
    """Copy a stream of buffers into page-aligned staging buffers; full ones are written
    by ``depth`` threads, each at its own offset, while the next one fills.

    Small streams never leave the first buffer and are written plainly (buffered). Once
    a buffer fills, the fd is switched to O_DIRECT (if allowed).
    """

    def __init__(self, fd: int, pool: _BufferPool, direct: bool, depth: int) -> None:
        self.fd, self.pool, self.allow_direct, self.depth = fd, pool, direct, depth
        self.direct = False
        self.buf: mmap.mmap | None = None
        self.fill = 0
        self.total = 0
        self.offset = 0  # file offset of the next full buffer
        self.threads: list[threading.Thread] = []
        self.pending: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(depth)  # buffers queued or being written
        self.error: BaseException | None = None

    def _writer_loop(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                return
            buf, offset = item
            try:
                if self.error is None:
                    _write_all(self.fd, memoryview(buf), offset)
            except BaseException as exc:  # surfaced to the producer on its next call
                self.error = self.error or exc
            finally:
                self.pool.give(buf)
                self.slots.release()

    def _flush_full(self) -> None:
        if not self.threads:
            self.direct = self.allow_direct and _enable_direct(self.fd)
        self.slots.acquire()  # waits while ``depth`` buffers are in flight
        if self.error is not None:
            self.slots.release()
            raise self.error
        if len(self.threads) < self.depth:
            thread = threading.Thread(target=self._writer_loop, daemon=True,
                                      name="trainguard-local-writer")
            thread.start()
            self.threads.append(thread)
        self.pending.put((self.buf, self.offset))
        self.offset += self.fill
        self.buf, self.fill = None, 0

    def add(self, view: memoryview) -> None:
        self.total += len(view)
        while view:
            if self.buf is None:
                self.buf = self.pool.take()
            n = min(len(view), self.pool.size - self.fill)
            self.buf[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.pool.size:
                self._flush_full()

    def _join(self) -> None:
        """Wait for every queued write; stop the threads."""
        for _ in self.threads:
            self.pending.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []

    def finish(self) -> int:
        try:
            self._join()
            if self.error is not None:
                raise self.error
            if self.buf is not None and self.fill:
                if self.direct:
                    padded = -(-self.fill // _ALIGN) * _ALIGN
                    self.buf[self.fill:padded] = bytes(padded - self.fill)
                    _write_all(self.fd, memoryview(self.buf)[:padded], self.offset)
                    os.ftruncate(self.fd, self.total)
                else:
                    _write_all(self.fd, memoryview(self.buf)[:self.fill], self.offset)
        finally:
            if self.buf is not None:
                self.pool.give(self.buf)
                self.buf = None
        return self.total

    def abort(self) -> None:
        """Stop after the writes in flight (the fd is closed next: none may outlive it)."""
        self.error = self.error or RuntimeError("aborted")
        self._join()
        if self.buf is not None:
            self.pool.give(self.buf)
            self.buf = None


class LocalStore:
    """A store rooted at a local directory (the embedded default).

    Args:
        root: the directory; created on the first write when missing.
        direct_io: use O_DIRECT for large reads and writes where the filesystem allows.
        chunk_bytes: size of each staging buffer (one write) and of each read in flight.
        write_depth: full staging buffers being written at once, per file.
    """

    def __init__(self, root: str | os.PathLike, *, direct_io: bool = True,
                 chunk_bytes: int = 32 << 20, write_depth: int = _WRITE_DEPTH) -> None:
        if chunk_bytes <= 0 or chunk_bytes % _ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {_ALIGN}")
        if write_depth < 1:
            raise ValueError(f"write_depth must be at least 1, got {write_depth}")
        self.root = Path(root).expanduser().absolute()
        self.direct_io = direct_io
        self.write_depth = write_depth
        self._pool = _BufferPool(chunk_bytes)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The root directory, as a string."""
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def path(self, key: str, *, final_link_ok: bool = False) -> Path:
        """The filesystem path of ``key``, validated: it cannot leave the root.

        Args:
            key: the store key.
            final_link_ok: let the last component be a link (``delete`` removes the link).

        Raises:
            ValueError: the key is malformed (see :func:`~trainguard.store.base.check_key`).
            UnsafePath: a component below the root is a symbolic link.
        """
        parts = check_key(key).split("/")
        path = self.root
        for i, part in enumerate(parts):
            path = path / part
            if final_link_ok and i == len(parts) - 1:
                break
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return self.root.joinpath(*parts)  # nothing further exists to be a link
            except OSError as exc:
                raise StoreError(f"cannot stat {path}: {exc.strerror}") from exc
            if stat.S_ISLNK(mode):
                raise link_refused(path)
        return path

    # -- writing -------------------------------------------------------------------------

    def _makedirs(self, directory: Path) -> None:
        missing = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for new_dir in reversed(missing):
            try:
                new_dir.mkdir()
            except FileExistsError:
                pass
            fsync_dir(new_dir.parent)  # the new entry itself must survive a crash

    def write(self, key: str, data: Data) -> int:
        """Atomically and durably write ``data`` at ``key``; returns bytes written."""
        return self._publish(key, data, exclusive=False)

    def create(self, key: str, data: Data) -> int:
        """Write ``data`` at ``key`` only if nothing is there: never overwrites.

        The whole file appears at once (a hard link of the finished temp file, which
        fails when the name exists); on a filesystem without hard links, an existence
        check and a rename (the run directory's writer lock keeps others out).

        Raises:
            FileExistsError: ``key`` exists already; nothing was written.
        """
        return self._publish(key, data, exclusive=True)

    def _publish(self, key: str, data: Data, *, exclusive: bool) -> int:
        final = self.path(key)
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            self._makedirs(final.parent)
            total = self._write_temp(tmp, data)
            if exclusive:
                if _link_exclusive(tmp, final):
                    tmp.unlink()
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
            return total
        except BaseException as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(exc, FileExistsError) and exclusive:
                raise FileExistsError(f"{final} exists already; not overwritten") from None
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write {final}: {exc.strerror or exc}") from exc
            raise

    def _write_temp(self, tmp: Path, data: Data) -> int:
        """Write and fsync ``data`` to a fresh temp file; returns its size."""
        # O_EXCL: a file (or link) planted at the temp name is never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o644)
        writer = _StreamWriter(fd, self._pool, self.direct_io, self.write_depth)
        try:
            for view in _chunks(data):
                writer.add(view)
            total = writer.finish()
            os.fsync(fd)
        except BaseException:
            writer.abort()
            raise
        finally:
            os.close(fd)
        return total

    # -- reading -------------------------------------------------------------------------

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes.

        Raises:
            FileNotFoundError: ``key`` does not exist.
            UnsafePath: ``key`` is a link or not a regular file.
        """
        path = self.path(key)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot stat {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise special_refused(path, info.st_mode)
        return info.st_size

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a regular file in the store.

        Raises:
            UnsafePath: the key's path crosses a symbolic link.
        """
        try:
            return stat.S_ISREG(os.lstat(self.path(key)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def read(self, key: str, offset: int = 0, length: int | None = None) -> memoryview:
        """Read a byte range of ``key``; whole large files are read with O_DIRECT.

        Raises:
            FileNotFoundError: ``key`` does not exist.
            UnsafePath: ``key`` is a link or not a regular file (never opened blocking).
        """
        path = self.path(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range offset={offset} length={length} for {key!r}")
        try:
            fd = open_regular(path, os.O_RDONLY)
        except (FileNotFoundError, UnsafePath):
            raise
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            end = size if length is None else min(size, offset + length)
            count = max(0, end - offset)
            if (self.direct_io and offset == 0 and count == size
                    and size >= _DIRECT_MIN_BYTES and _enable_direct(fd)):
                return self._read_direct(fd, size)
            out = bytearray(count)
            view = memoryview(out)
            got = 0
            while got < count:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise StoreError(f"{path} shrank while being read")
                got += n
            return view
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _read_direct(self, fd: int, size: int) -> memoryview:
        """Read a whole file with O_DIRECT, several chunks in flight (a single stream
        leaves the device idle between requests: ~0.69 s vs ~0.89 s per GB here)."""
        padded = -(-size // _ALIGN) * _ALIGN
        buf = private_buffer(padded)
        view = memoryview(buf)
        step = self._pool.size

        def read_chunk(start: int) -> None:
            end = min(padded, start + step)
            got = start
            while got < min(end, size):
                n = os.preadv(fd, [view[got:end]], got)
                if n == 0:
                    raise StoreError(f"file shrank while being read (fd {fd})")
                got += n

        starts = range(0, padded, step)
        if len(starts) == 1:
            read_chunk(0)
        else:
            for future in [self._readers().submit(read_chunk, s) for s in starts]:
                future.result()
        return view[:size]

    def _readers(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(_READ_DEPTH,
                                                    thread_name_prefix="trainguard-read")
            return self._executor

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive, sorted); temp files are not keys.

        Links to files and special files are listed (a reader then refuses them, naming
        them); links to directories are not followed, so nothing under them is listed.
        """
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        try:
            mode = os.lstat(base).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return []
        if not stat.S_ISDIR(mode):
            return [prefix]
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):  # never follows links
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not name.startswith(TMP_PREFIX):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete ``key`` and prune directories it leaves empty (up to the root).

        A key that is a link is deleted as a link: its target is never touched.
        """
        path = self.path(key, final_link_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror}") from exc
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise StoreError(f"cannot remove {parent}: {exc.strerror}") from exc
            parent = parent.parent
        fsync_dir(parent) if parent.exists() else None

    def remove_temp_files(self, prefix: str = "") -> list[str]:
        """Delete temp files left by writers that died; returns the paths removed."""
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        removed = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    Path(dirpath, name).unlink(missing_ok=True)
                    removed.append(os.path.join(dirpath, name))
        return removed

    def commit(self) -> None:
        """Nothing to do: every write is already fsync'd and renamed into place."""

    def lock(self, name: str, purpose: str = "writer") -> FileLock:
        """A writer lock file at ``name`` inside the store (not yet acquired)."""
        return FileLock(self.path(name), purpose=purpose)

    def iter_dirs(self, prefix: str) -> Iterable[str]:
        """Names of the immediate sub-directories of ``prefix`` (sorted)."""
        base = self.path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(base)
                      if entry.is_dir(follow_symlinks=False))
