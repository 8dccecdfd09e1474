"""LocalStore: the conformance suite plus what only a local filesystem can show."""

from __future__ import annotations

import os

import pytest

from trainguard.errors import LockHeld, StoreError
from trainguard.store import LocalStore, open_store
from trainguard.store.base import ExclusiveCreate, Lockable, TempCleaning
from trainguard.store.local import TMP_PREFIX
from trainguard.testing.store_conformance import StoreConformance


class TestLocalStore(StoreConformance):
    claims = (ExclusiveCreate, Lockable, TempCleaning)

    @pytest.fixture
    def store(self, tmp_path):
        # Small staging buffers so the O_DIRECT pipeline and tail padding run in the suite.
        return LocalStore(tmp_path / "run", chunk_bytes=1 << 20)

    @pytest.fixture
    def second_view(self, store):
        return LocalStore(store.root)  # what another process opens on the same directory


class TestLocalStoreBuffered(TestLocalStore):
    @pytest.fixture
    def store(self, tmp_path):
        return LocalStore(tmp_path / "run", direct_io=False)


def test_failed_stream_leaves_old_object_and_no_temp_file(tmp_path):
    store = LocalStore(tmp_path, chunk_bytes=1 << 20)
    store.write("f.bin", b"old")

    def broken():
        yield b"x" * (3 << 20)
        raise RuntimeError("producer died mid-stream")

    with pytest.raises(RuntimeError, match="producer died"):
        store.write("f.bin", broken())
    assert bytes(store.read("f.bin")) == b"old"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


def test_temp_files_are_not_keys_and_can_be_removed(tmp_path):
    store = LocalStore(tmp_path)
    store.write("d/real", b"1")
    (tmp_path / "d" / f"{TMP_PREFIX}real.123.abcd").write_bytes(b"partial")
    assert store.list("d") == ["d/real"]
    removed = store.remove_temp_files()
    assert len(removed) == 1 and store.list("d") == ["d/real"]


def test_write_into_unwritable_dir_is_a_store_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="cannot write"):
        store.write("blocker/x", b"1")


def test_lock_is_exclusive_and_names_holder(tmp_path):
    store = LocalStore(tmp_path)
    first = store.lock(".lock").acquire()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        store.lock(".lock").acquire()
    first.release()
    store.lock(".lock").acquire().release()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path):
    """DataLoader workers are forks of the writer: killed, its workers lived on holding
    the flock, and the restarted writer found its run directory locked."""
    store = LocalStore(tmp_path)
    lock = store.lock(".lock").acquire()
    go, stay = os.pipe()
    up, started = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": up and running, alive until the parent closes the pipe
        os.close(stay)
        os.write(started, b"1")
        os.read(go, 1)
        os._exit(0)
    os.close(go)
    os.close(started)
    try:
        assert os.read(up, 1) == b"1"
        lock.release()  # as the kernel does for a killed writer
        store.lock(".lock").acquire().release()  # the next writer is not refused
    finally:
        os.close(stay)
        os.close(up)
        os.waitpid(pid, 0)


def test_open_store_accepts_paths_and_file_urls(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert open_store(f"file://{tmp_path}").url == str(tmp_path)
    with pytest.raises(ValueError, match="no storage backend"):
        open_store("gopher://x/y")


def test_without_flock_a_dead_holder_is_taken_over_a_live_one_is_not(tmp_path, monkeypatch):
    """Network filesystems may not support flock: then the pid/host record decides."""
    import errno
    import fcntl
    import json
    import socket
    import subprocess
    import sys

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_path = tmp_path / ".lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    lock_path.write_text(json.dumps({"pid": int(dead.stdout), "host": host, "since": 1.0}))
    taken = LocalStore(tmp_path).lock(".lock").acquire()
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    taken.release()

    lock_path.write_text(json.dumps({"pid": os.getppid(), "host": host, "since": 1.0}))
    with pytest.raises(LockHeld, match=f"pid {os.getppid()}"):
        LocalStore(tmp_path).lock(".lock").acquire()
    lock_path.write_text(json.dumps({"pid": 1, "host": "another-host", "since": 1.0}))
    with pytest.raises(LockHeld, match="another-host"):
        LocalStore(tmp_path).lock(".lock").acquire()



def _blob(nbytes: int, seed: int = 0) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("direct_io", [True, False])
@pytest.mark.parametrize("depth", [1, 3])
def test_streams_land_whole_with_several_writes_in_flight(tmp_path, direct_io, depth):
    # 1 MiB staging buffers: 5 full ones written `depth` at a time, each at its own
    # offset, then a tail that is not a whole page (padded, written, truncated).
    store = LocalStore(tmp_path, direct_io=direct_io, chunk_bytes=1 << 20,
                       write_depth=depth)
    blob = _blob((5 << 20) + 1234)
    view = memoryview(blob)
    store.write("a.bin", [b"header", view[:3 << 20], view[3 << 20:], b"tail"])
    assert bytes(store.read("a.bin")) == b"header" + blob + b"tail"
    store.write("b.bin", blob)
    assert bytes(store.read("b.bin")) == blob


def test_a_failed_write_in_flight_fails_the_write_and_leaves_nothing(tmp_path, monkeypatch):
    import trainguard.store.local as local

    store = LocalStore(tmp_path, chunk_bytes=1 << 20, write_depth=3)
    store.write("f.bin", b"old")
    calls = []
    real = os.pwrite

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(local.os, "pwrite", failing)
    with pytest.raises(StoreError, match="No space left"):
        store.write("f.bin", _blob(6 << 20))
    monkeypatch.setattr(local.os, "pwrite", real)
    assert bytes(store.read("f.bin")) == b"old"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


def test_write_depth_is_checked(tmp_path):
    with pytest.raises(ValueError, match="write_depth"):
        LocalStore(tmp_path, write_depth=0)
