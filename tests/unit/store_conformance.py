"""The conformance suite every Store backend passes. A backend's test is one line::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path): return MyStore(...)
"""

from __future__ import annotations

import numpy as np
import pytest

from trainguard.store import Store


class StoreConformance:
    """Behaviour every backend must show; subclasses provide a ``store`` fixture."""

    def test_is_a_store(self, store):
        assert isinstance(store, Store)
        assert isinstance(store.url, str) and store.url

    def test_write_bytes_then_read(self, store):
        assert store.write("a/b.bin", b"hello world") == 11
        assert bytes(store.read("a/b.bin")) == b"hello world"
        assert store.size("a/b.bin") == 11
        assert store.exists("a/b.bin")
        assert not store.exists("a/c.bin")

    def test_write_stream_of_mixed_buffers(self, store):
        arr = np.arange(1000, dtype=np.float32)
        parts = [b"head", bytearray(b"-mid-"), memoryview(arr)]
        n = store.write("s.bin", iter(parts))
        expected = b"head-mid-" + arr.tobytes()
        assert n == len(expected)
        assert bytes(store.read("s.bin")) == expected

    def test_large_stream_crosses_buffer_boundaries(self, store):
        rng = np.random.default_rng(0)
        blob = rng.integers(0, 256, size=(5 << 20) + 12345, dtype=np.uint8).tobytes()
        pieces = [memoryview(blob)[i:i + 777_777] for i in range(0, len(blob), 777_777)]
        assert store.write("big.bin", pieces) == len(blob)
        assert store.size("big.bin") == len(blob)
        assert bytes(store.read("big.bin")) == blob

    def test_ranged_read(self, store):
        store.write("r.bin", bytes(range(256)))
        assert bytes(store.read("r.bin", 10, 5)) == bytes(range(10, 15))
        assert bytes(store.read("r.bin", 250)) == bytes(range(250, 256))
        assert bytes(store.read("r.bin", 300, 5)) == b""

    def test_empty_object(self, store):
        assert store.write("empty", b"") == 0
        assert store.exists("empty") and store.size("empty") == 0
        assert bytes(store.read("empty")) == b""

    def test_overwrite_replaces_whole_object(self, store):
        store.write("o.bin", b"x" * 1000)
        store.write("o.bin", b"short")
        assert bytes(store.read("o.bin")) == b"short"

    def test_list_is_recursive_sorted_and_prefixed(self, store):
        for key in ["d/2", "d/1", "d/sub/3", "e/4", "de"]:
            store.write(key, b".")
        assert store.list("d") == ["d/1", "d/2", "d/sub/3"]
        assert store.list("d/") == ["d/1", "d/2", "d/sub/3"]
        assert store.list("nothing") == []
        assert {"d/1", "d/2", "d/sub/3", "e/4", "de"} <= set(store.list())

    def test_delete(self, store):
        store.write("x/y", b"1")
        store.delete("x/y")
        assert not store.exists("x/y")
        assert store.list("x") == []
        store.delete("x/y")  # deleting a missing key is not an error

    def test_create_never_replaces_an_object(self, store):
        """How a manifest is published: a second create of a key leaves the first."""
        assert store.create("c/manifest.json", b"first") == 5
        with pytest.raises(FileExistsError):
            store.create("c/manifest.json", b"second, from a writer that lost the run")
        assert bytes(store.read("c/manifest.json")) == b"first"
        assert store.list("c") == ["c/manifest.json"]

    def test_missing_key_raises_file_not_found(self, store):
        with pytest.raises(FileNotFoundError):
            store.read("nope")
        with pytest.raises(FileNotFoundError):
            store.size("nope")

    @pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b", "", "a\\b", "./a"])
    def test_keys_that_could_escape_are_refused(self, store, key):
        with pytest.raises(ValueError):
            store.write(key, b"x")
        with pytest.raises(ValueError):
            store.read(key)

    def test_commit_after_writes(self, store):
        store.write("c", b"1")
        store.commit()
        assert bytes(store.read("c")) == b"1"
