"""The conformance suite every :class:`~trainguard.store.Store` backend passes.

A backend's test module subclasses it and says how to open the store::

    import pytest
    from trainguard.store.base import ExclusiveCreate, Lockable
    from trainguard.testing.store_conformance import StoreConformance

    class TestMyStore(StoreConformance):
        claims = (ExclusiveCreate, Lockable)

        @pytest.fixture
        def store(self, tmp_path):
            return MyStore(tmp_path / "run")

:class:`StoreConformance` checks the core protocol (``base.py``: all-or-nothing writes,
ranged reads, recursive sorted listing, deletes, keys that cannot leave the store, what
is committed visible to another view), then the contract of each optional capability the
store offers (``isinstance(store, Lockable)`` and so on); ``claims`` pins which ones it
offers, so a capability lost in a refactor fails the suite instead of skipping its checks.
:class:`ReadOnlyStoreConformance` is the read side alone, for a view that reads what a
writer committed (``ModalVolumeReader``).

Fixtures a subclass provides or overrides:

* ``store`` (required): a fresh, empty store.
* ``second_view`` (optional, writable suite): another object on the same store, opened
  before anything is written, as another process would open it (default: ``store``
  itself, for stores that exist only as one object, such as ``MemoryStore``).
* ``writer`` (required, read-only suite): a writable store whose commits ``store`` reads.

Class attributes say what differs on purpose between backends; each is documented below.

This module imports pytest (``import trainguard.testing`` does not). For pytest's
detailed assertion messages, add to your ``conftest.py``, before anything imports it::

    pytest.register_assert_rewrite("trainguard.testing.store_conformance")
"""

from __future__ import annotations

import array
import random
import threading
from collections.abc import Callable, Iterator

import pytest

from trainguard.errors import LockHeld, StoreError
from trainguard.store.base import (
    ExclusiveCreate,
    Lockable,
    Refreshable,
    Retrying,
    Store,
    TempCleaning,
    WriterLock,
)

__all__ = ["CAPABILITIES", "ReadOnlyStoreConformance", "StoreConformance"]

#: The optional capabilities a store may offer (``store/base.py``), checked when offered.
CAPABILITIES = (ExclusiveCreate, Lockable, Refreshable, TempCleaning, Retrying)

#: Keys that could address something outside the store: every operation refuses them.
ESCAPING_KEYS = ["../escape", "/abs", "a/../../b", "a//b", "", "a\\b", "./a", "a/./b", "x\x00"]
#: Prefixes ``list`` refuses (a leading or trailing ``/`` is allowed there: ``list("d/")``).
ESCAPING_PREFIXES = ["../escape", "a/../../b", "a//b", "a\\b", "./a"]


def _blob(nbytes: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def _offered(store: object) -> list[str]:
    return sorted(cap.__name__ for cap in CAPABILITIES if isinstance(store, cap))


class _ReadContract:
    """What every store shows to a reader; a suite provides ``store`` and ``publish``."""

    #: The optional capabilities (classes from ``store/base.py``) the store must offer,
    #: exactly; each subclass says, so that losing one fails instead of skipping checks.
    claims: tuple[type, ...] | None = None

    def test_offers_exactly_the_capabilities_it_claims(self, store):
        assert self.claims is not None, (
            f"{type(self).__name__} must set `claims` to the capabilities its store offers "
            f"(it offers {_offered(store)})")
        assert _offered(store) == sorted(cap.__name__ for cap in self.claims)

    def test_is_a_store(self, store):
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    def test_reads_whole_object_size_and_existence(self, store, publish):
        publish({"a/b.bin": b"hello world"})
        data = store.read("a/b.bin")
        assert isinstance(data, memoryview) and bytes(data) == b"hello world"
        assert store.size("a/b.bin") == 11
        assert store.exists("a/b.bin")
        assert not store.exists("a/c.bin") and not store.exists("a")

    def test_ranged_read(self, store, publish):
        publish({"r.bin": bytes(range(256))})
        assert bytes(store.read("r.bin", 10, 5)) == bytes(range(10, 15))
        assert bytes(store.read("r.bin", 250)) == bytes(range(250, 256))
        assert bytes(store.read("r.bin", 250, 100)) == bytes(range(250, 256))
        assert bytes(store.read("r.bin", 300, 5)) == b""
        assert bytes(store.read("r.bin", 7, 0)) == b""

    def test_negative_range_is_refused(self, store, publish):
        publish({"r.bin": b"0123456789"})
        with pytest.raises(ValueError):
            store.read("r.bin", -1)
        with pytest.raises(ValueError):
            store.read("r.bin", 0, -1)

    def test_empty_object(self, store, publish):
        publish({"empty": b""})
        assert store.exists("empty") and store.size("empty") == 0
        assert bytes(store.read("empty")) == b""
        assert store.list() == ["empty"]

    def test_list_is_recursive_sorted_and_prefixed(self, store, publish):
        publish(dict.fromkeys(["d/2", "d/1", "d/sub/3", "e/4", "de"], b"."))
        assert store.list("d") == ["d/1", "d/2", "d/sub/3"]
        assert store.list("d/") == ["d/1", "d/2", "d/sub/3"]
        assert store.list("d/sub") == ["d/sub/3"]
        assert store.list("nothing") == []
        assert store.list() == ["d/1", "d/2", "d/sub/3", "de", "e/4"]

    def test_missing_key_raises_file_not_found(self, store):
        with pytest.raises(FileNotFoundError):
            store.read("nope")
        with pytest.raises(FileNotFoundError):
            store.size("nope")
        with pytest.raises(FileNotFoundError):
            store.read("no/such/dir/key", 3, 4)
        assert not store.exists("nope")

    @pytest.mark.parametrize("key", ESCAPING_KEYS)
    def test_keys_that_could_escape_are_refused_by_reads(self, store, key):
        for read in (store.read, store.size, store.exists):
            with pytest.raises(ValueError):
                read(key)

    @pytest.mark.parametrize("prefix", ESCAPING_PREFIXES)
    def test_prefixes_that_could_escape_are_refused_by_list(self, store, prefix):
        with pytest.raises(ValueError):
            store.list(prefix)


class StoreConformance(_ReadContract):
    """Behaviour every writable backend must show (see the module docs for the fixtures)."""

    #: Bytes a producer sends before it fails, in the all-or-nothing check: past the part
    #: size of a backend that uploads in parts (``ObjectStore``: 16 MiB), so that a part
    #: was sent when the stream fails.
    failing_stream_bytes: int = 20 << 20

    @pytest.fixture
    def second_view(self, store):
        """Another view of ``store`` (see the module docs); override where one exists."""
        return store

    @pytest.fixture
    def publish(self, store) -> Callable[[dict[str, bytes]], None]:
        def publish(files: dict[str, bytes]) -> None:
            for key, data in files.items():
                assert store.write(key, data) == len(data)
            store.commit()
        return publish

    # -- writing ---------------------------------------------------------------------------

    def test_write_returns_the_size_written(self, store):
        assert store.write("a/b.bin", b"hello world") == 11
        assert bytes(store.read("a/b.bin")) == b"hello world"

    def test_write_stream_of_mixed_buffers(self, store):
        floats = array.array("f", range(1000))  # a memoryview whose items are 4 bytes
        parts = [b"head", bytearray(b"-mid-"), memoryview(floats)]
        n = store.write("s.bin", iter(parts))
        expected = b"head-mid-" + floats.tobytes()
        assert n == len(expected)
        assert bytes(store.read("s.bin")) == expected

    def test_large_stream_crosses_buffer_boundaries(self, store):
        blob = _blob((5 << 20) + 12345)
        pieces = [memoryview(blob)[i:i + 777_777] for i in range(0, len(blob), 777_777)]
        assert store.write("big.bin", pieces) == len(blob)
        assert store.size("big.bin") == len(blob)
        assert bytes(store.read("big.bin")) == blob
        assert bytes(store.read("big.bin", 1 << 20, 10)) == blob[1 << 20:(1 << 20) + 10]

    def test_a_failing_stream_leaves_the_old_object_and_nothing_else(self, store):
        """A write is all-or-nothing: a producer that dies mid-stream (a save interrupted
        by an exception) must leave what was there, never a prefix of the new object."""
        store.write("f.bin", b"old")
        store.commit()
        piece = bytes(1 << 20)

        def dying() -> Iterator[bytes]:
            for _ in range(self.failing_stream_bytes // len(piece)):
                yield piece
            raise RuntimeError("producer died mid-stream")

        for key in ("f.bin", "g.bin"):  # g.bin is new: it must not appear at all
            # the producer's error, as it is or translated at the boundary (StoreError)
            with pytest.raises((RuntimeError, StoreError)) as caught:
                store.write(key, dying())
            chain = [caught.value, caught.value.__cause__, caught.value.__context__]
            assert any("producer died" in str(e) for e in chain if e is not None), chain
        store.commit()
        assert bytes(store.read("f.bin")) == b"old"
        assert store.list() == ["f.bin"] and not store.exists("g.bin")

    def test_overwrite_replaces_whole_object(self, store):
        store.write("o.bin", b"x" * 1000)
        store.write("o.bin", b"short")
        assert bytes(store.read("o.bin")) == b"short" and store.size("o.bin") == 5

    def test_a_read_buffer_is_not_the_store(self, store):
        """What ``read`` returns may be kept and changed by the caller (a tensor made from
        it): the stored object stays as written."""
        store.write("k", b"abcdef")
        view = store.read("k")
        if not view.readonly:
            view[0:1] = b"X"
        assert bytes(store.read("k")) == b"abcdef"

    def test_delete(self, store):
        store.write("x/y", b"1")
        store.write("x/z", b"2")
        store.delete("x/y")
        assert not store.exists("x/y") and store.list("x") == ["x/z"]
        store.delete("x/z")
        assert store.list("x") == [] and store.list() == []
        store.delete("x/y")  # deleting a missing key is not an error
        store.delete("never/was")

    @pytest.mark.parametrize("key", ESCAPING_KEYS)
    def test_keys_that_could_escape_are_refused_by_writes(self, store, key):
        with pytest.raises(ValueError):
            store.write(key, b"x")
        with pytest.raises(ValueError):
            store.delete(key)
        if isinstance(store, ExclusiveCreate):
            with pytest.raises(ValueError):
                store.create(key, b"x")
        assert store.list() == []

    def test_writes_from_several_threads_all_land(self, store):
        """A checkpoint's shards are written by a pool of threads through one store."""
        def write_some(n: int) -> None:
            for i in range(4):
                store.write(f"t/{n}/{i}", f"{n}-{i}".encode())

        threads = [threading.Thread(target=write_some, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store.commit()
        keys = sorted(f"t/{n}/{i}" for n in range(8) for i in range(4))
        assert store.list("t") == keys
        assert all(bytes(store.read(k)) == f"{k[2]}-{k[4]}".encode() for k in keys)

    # -- what another view sees ------------------------------------------------------------

    def test_committed_writes_and_deletes_are_visible_to_another_view(self, store,
                                                                      second_view):
        store.write("v/k", b"first")
        store.commit()
        _refresh(second_view)
        assert bytes(second_view.read("v/k")) == b"first" and second_view.list("v") == ["v/k"]
        store.write("v/k", b"second")
        store.commit()
        _refresh(second_view)
        assert bytes(second_view.read("v/k")) == b"second"
        store.delete("v/k")
        store.commit()
        _refresh(second_view)
        assert not second_view.exists("v/k") and second_view.list("v") == []

    # -- ExclusiveCreate -------------------------------------------------------------------

    def test_create_writes_a_new_key(self, store):
        _require(store, ExclusiveCreate)
        assert store.create("c/manifest.json", b"first") == 5
        assert store.create("c/stream", iter([b"ab", bytearray(b"cd")])) == 4
        assert bytes(store.read("c/manifest.json")) == b"first"
        assert bytes(store.read("c/stream")) == b"abcd"

    def test_create_never_replaces_an_object(self, store):
        """How a manifest is published: a second create of a key leaves the first."""
        _require(store, ExclusiveCreate)
        store.create("c/manifest.json", b"first")
        store.write("c/written", b"by write")
        with pytest.raises(FileExistsError):
            store.create("c/manifest.json", b"second, from a writer that lost the run")
        with pytest.raises(FileExistsError):
            store.create("c/written", b"other")
        assert bytes(store.read("c/manifest.json")) == b"first"
        assert bytes(store.read("c/written")) == b"by write"
        assert store.list("c") == ["c/manifest.json", "c/written"]

    def test_of_creates_racing_for_one_key_exactly_one_wins(self, store):
        _require(store, ExclusiveCreate)
        won, lost = [], []
        barrier = threading.Barrier(4)

        def race(n: int) -> None:
            barrier.wait()
            try:
                store.create("race", f"writer {n}".encode())
                won.append(n)
            except FileExistsError:
                lost.append(n)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1 and len(lost) == 3, (won, lost)
        assert bytes(store.read("race")) == f"writer {won[0]}".encode()

    # -- Lockable --------------------------------------------------------------------------

    def test_lock_is_a_writer_lock_taken_confirmed_and_released(self, store):
        _require(store, Lockable)
        lock = store.lock("writer.lock")
        assert isinstance(lock, WriterLock)
        with pytest.raises(LockHeld):
            lock.confirm()  # not taken yet
        assert lock.acquire() is lock
        assert lock.confirm() is lock
        assert lock.acquire() is lock  # its holder taking it again: a no-op
        lock.release()
        with pytest.raises(LockHeld):
            lock.confirm()
        lock.release()  # releasing a lock not held is not an error
        lock.acquire().release()  # and it can be taken again

    def test_a_second_holder_is_refused_until_the_first_releases(self, store):
        _require(store, Lockable)
        first = store.lock("writer.lock").acquire()
        second = store.lock("writer.lock")
        with pytest.raises(LockHeld):
            second.acquire()
        first.confirm()  # the refusal did not take anything from the holder
        first.release()
        second.acquire()
        second.confirm()
        with pytest.raises(LockHeld):
            store.lock("writer.lock").acquire()
        second.release()

    def test_the_refusal_names_what_the_holder_does(self, store):
        _require(store, Lockable)
        holder = store.lock("writer.lock", purpose="gc").acquire()
        try:
            with pytest.raises(LockHeld, match="gc"):
                store.lock("writer.lock").acquire()
        finally:
            holder.release()

    def test_locks_of_different_names_are_independent(self, store):
        _require(store, Lockable)
        a = store.lock("a.lock").acquire()
        b = store.lock("b.lock").acquire()
        a.confirm()
        b.confirm()
        a.release()
        b.release()

    @pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b", ""])
    def test_lock_names_that_could_escape_are_refused(self, store, name):
        _require(store, Lockable)
        with pytest.raises(ValueError):
            store.lock(name)

    # -- Refreshable, TempCleaning, Retrying -----------------------------------------------

    def test_refresh_keeps_what_was_committed(self, store, second_view):
        _require(store, Refreshable)
        store.write("k", b"committed")
        store.commit()
        store.refresh()
        store.refresh()
        assert bytes(store.read("k")) == b"committed" and store.list() == ["k"]
        second_view.refresh()
        assert bytes(second_view.read("k")) == b"committed"

    def test_remove_temp_files_keeps_every_key(self, store):
        _require(store, TempCleaning)
        files = {"d/real": b"1", "d/sub/.hidden": b"2", ".lockish": b"3", "top": b"4"}
        for key, data in files.items():
            store.write(key, data)
        store.commit()
        assert isinstance(store.remove_temp_files(), list)
        assert isinstance(store.remove_temp_files("d"), list)
        assert store.remove_temp_files("nothing/here") == []
        assert store.list() == sorted(files)
        assert {key: bytes(store.read(key)) for key in files} == files

    def test_with_retry_is_a_view_of_the_same_store(self, store):
        _require(store, Retrying)
        from trainguard.store.retry import Backoff

        view = store.with_retry(Backoff(budget=0))
        assert isinstance(view, Store) and view.url == store.url
        view.write("through/view", b"1")
        store.write("through/store", b"2")
        assert bytes(store.read("through/view")) == b"1"
        assert bytes(view.read("through/store")) == b"2"


class ReadOnlyStoreConformance(_ReadContract):
    """The read side, for a store that only reads what a ``writer`` committed.

    Every write refuses with :class:`~trainguard.errors.StoreError` and changes nothing.
    """

    @pytest.fixture
    def publish(self, store, writer) -> Callable[[dict[str, bytes]], None]:
        def publish(files: dict[str, bytes]) -> None:
            for key, data in files.items():
                writer.write(key, data)
            writer.commit()
            _refresh(store)
        return publish

    def test_sees_an_overwrite_and_a_delete_once_committed(self, store, writer, publish):
        publish({"k": b"first"})
        assert bytes(store.read("k")) == b"first"
        publish({"k": b"second, longer"})
        assert bytes(store.read("k")) == b"second, longer" and store.size("k") == 14
        writer.delete("k")
        writer.commit()
        _refresh(store)
        assert not store.exists("k") and store.list() == []
        with pytest.raises(FileNotFoundError):
            store.read("k")

    def test_writes_are_refused_and_change_nothing(self, store, publish):
        publish({"k": b"kept"})
        with pytest.raises(StoreError):
            store.write("k", b"changed")
        with pytest.raises(StoreError):
            store.write("new", b"x")
        with pytest.raises(StoreError):
            store.delete("k")
        store.commit()  # nothing to commit: not an error
        assert bytes(store.read("k")) == b"kept" and store.list() == ["k"]


def _refresh(store: object) -> None:
    if isinstance(store, Refreshable):
        store.refresh()


def _require(store: object, capability: type) -> None:
    if not isinstance(store, capability):
        pytest.skip(f"{type(store).__name__} does not offer {capability.__name__}")
