"""ModalVolumeStore: a checkpoint counts only after volume.commit() followed its manifest."""

from __future__ import annotations

import shutil
import types

import pytest
import torch
from torch import nn

from trainguard import CheckpointManager
from trainguard.errors import StoreError
from trainguard.launch.sync import sync_once
from trainguard.run import Run
from trainguard.store import ModalVolumeReader, ModalVolumeStore, open_store
from trainguard.store.base import ExclusiveCreate, Lockable, Refreshable, TempCleaning
from trainguard.store.modal_volume import register_mount, unregister_mount
from trainguard.testing.modal_local.volumes import Volume
from trainguard.testing.store_conformance import ReadOnlyStoreConformance, StoreConformance

FAST = {"heartbeat_seconds": 3600.0, "tensorboard": False, "wandb": False}


class MountedVolume:
    """``modal.Volume`` as a container sees it, on the local control plane's model of a
    volume (``testing/modal_local/volumes.py``): this container's view, committed and
    reloaded with Modal's semantics (others see nothing until a commit and a reload)."""

    def __init__(self, volume: Volume, mount) -> None:
        self.view = volume.mount(mount)
        self.commit, self.reload = self.view.commit, self.view.reload


class VolumeAPI:
    """``modal.Volume``'s reading API outside a container (``listdir``/``read_file``) on
    the model's committed tree, as ``VolumeListFiles``/``VolumeGetFile2`` serve it."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    def listdir(self, path, recursive=False):
        return [types.SimpleNamespace(path=name, size=size, mtime=mtime, type=2 if is_dir else 1)
                for name, is_dir, size, mtime in self.volume.entries(path, recursive)]

    def read_file(self, path):
        yield self.volume.read(path)


@pytest.fixture
def volume(tmp_path):
    return Volume("vo-1", "runs", tmp_path / "volume")


def volume_store(volume: Volume, mount) -> ModalVolumeStore:
    """The run directory ``run`` of a container that mounted ``volume`` at ``mount``."""
    mounted = MountedVolume(volume, mount)
    return ModalVolumeStore(mounted.view.root / "run", mounted, chunk_bytes=1 << 20)


class TestModalVolumeStore(StoreConformance):
    claims = (ExclusiveCreate, Lockable, Refreshable, TempCleaning)

    @pytest.fixture
    def store(self, volume, tmp_path):
        return volume_store(volume, tmp_path / "container-a")

    @pytest.fixture
    def second_view(self, volume, tmp_path, store):
        return volume_store(volume, tmp_path / "container-b")  # another container


class TestModalVolumeReader(ReadOnlyStoreConformance):
    claims = (Refreshable,)

    @pytest.fixture
    def store(self, volume):
        return ModalVolumeReader("modal://runs/run", volume=VolumeAPI(volume))

    @pytest.fixture
    def writer(self, volume, tmp_path):
        return volume_store(volume, tmp_path / "container")


def test_a_container_sees_only_what_was_committed(volume, tmp_path):
    """What the conformance suite cannot say of every store: on a volume, writes are
    invisible to other containers and to readers until committed."""
    store = volume_store(volume, tmp_path / "a")
    other = volume_store(volume, tmp_path / "b")
    reader = ModalVolumeReader("modal://runs/run", volume=VolumeAPI(volume))
    store.write("k", b"pending")
    other.refresh()
    assert not other.exists("k") and not reader.exists("k")
    store.commit()
    assert not other.exists("k")  # its view is stale until it reloads
    other.refresh()
    assert bytes(other.read("k")) == b"pending" and bytes(reader.read("k")) == b"pending"


class RecordingVolume:
    """A stand-in for modal.Volume: records commits into a shared event log."""

    def __init__(self, events: list, fail: bool = False) -> None:
        self.events, self.fail = events, fail

    def commit(self) -> None:
        if self.fail:
            raise ConnectionError("volume commit refused")
        self.events.append(("commit",))


class RecordingStore(ModalVolumeStore):
    """Records every write next to the volume's commits, in order."""

    def write(self, key, data):
        written = super().write(key, data)
        self.volume.events.append(("write", key))
        return written

    def create(self, key, data):  # how a manifest is published
        written = super().create(key, data)
        self.volume.events.append(("write", key))
        return written


def _assert_manifest_then_commit(events: list) -> int:
    manifests = [i for i, e in enumerate(events)
                 if e[0] == "write" and e[1].endswith("manifest.json")]
    assert manifests, events
    for i in manifests:  # the very next thing after a manifest write is volume.commit()
        assert events[i + 1] == ("commit",), events[i:i + 2]
    return len(manifests)


def test_every_checkpoint_manifest_is_followed_by_a_volume_commit(tmp_path):
    events: list = []
    store = RecordingStore(tmp_path / "run", RecordingVolume(events))
    manager = CheckpointManager(store)
    for step in (1, 2, 3):
        manager.save(step, {"w": torch.full((4,), float(step))}).wait()
    manager.close()
    assert _assert_manifest_then_commit(events) == 3
    assert store.commits == len([e for e in events if e == ("commit",)])


def test_run_commits_the_volume_after_each_save_and_when_the_loop_fails(tmp_path):
    events: list = []
    volume = RecordingVolume(events)
    register_mount(tmp_path, volume)
    try:
        store = open_store(tmp_path / "run")  # what Run() gets inside the container
        assert isinstance(store, ModalVolumeStore)
        store.__class__ = RecordingStore  # record its writes too
        model = nn.Linear(2, 2)
        with pytest.raises(RuntimeError, match="boom"):
            with Run(store, save_every_steps=2, **FAST) as run:
                run.track(model=model)
                for step in run.steps(10):
                    if step == 5:
                        raise RuntimeError("boom")
    finally:
        unregister_mount(tmp_path)
    assert _assert_manifest_then_commit(events) >= 2  # steps 2 and 4, then the error save
    steps = [i.step for i in CheckpointManager(tmp_path / "run").list() if i.valid]
    assert steps[-1] >= 4
    assert events[-1] == ("commit",)


def test_a_failing_volume_commit_is_a_store_error_and_the_save_is_not_reported(tmp_path):
    store = ModalVolumeStore(tmp_path / "run", RecordingVolume([], fail=True))
    manager = CheckpointManager(store)
    with pytest.raises(Exception) as caught:
        manager.save(1, {"w": torch.zeros(2)}).wait()
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    assert any(isinstance(e, StoreError) and "volume.commit()" in str(e) for e in chain), chain


class DirVolume:
    """A fake of the Volume API (listdir/read_file) over a local directory."""

    def __init__(self, root) -> None:
        self.root = root

    def listdir(self, path, recursive=False):
        base = self.root / path.strip("/")
        if not base.exists():
            raise FileNotFoundError(path)
        found = [base] if base.is_file() else sorted(base.rglob("*"))  # as the real API
        return [types.SimpleNamespace(path=str(p.relative_to(self.root)), size=p.stat().st_size,
                                      type=1 if p.is_file() else 2) for p in found]

    def read_file(self, path):
        yield (self.root / path).read_bytes()


def test_sync_from_a_modal_url_copies_only_committed_checkpoints(tmp_path):
    volume_dir = tmp_path / "vol"
    manager = CheckpointManager(volume_dir / "runs" / "exp")
    for step in (1, 2):
        manager.save(step, {"w": torch.full((8,), float(step))}).wait()
    manager.close()
    # step 3 was written but its manifest never committed: readers must not trust it
    shutil.copytree(volume_dir / "runs/exp/checkpoints/step-000000002",
                    volume_dir / "runs/exp/checkpoints/step-000000003")
    (volume_dir / "runs/exp/checkpoints/step-000000003/manifest.json").unlink()
    reader = ModalVolumeReader("modal://vol/runs/exp", volume=DirVolume(volume_dir))
    info = sync_once(reader, str(tmp_path / "dest"))
    assert info.step == 2 and info.valid
    with pytest.raises(StoreError, match="read-only"):
        reader.write("x", b"1")


def test_modal_urls_are_parsed_and_bad_ones_refused():
    from trainguard.store.modal_volume import parse_modal_url

    assert parse_modal_url("modal://runs/a/b") == ("runs", "a/b")
    with pytest.raises(ValueError, match="modal://VOLUME/PATH"):
        parse_modal_url("modal://")


def test_refresh_reloads_the_volume_and_names_a_failure(tmp_path):
    calls = []

    class Reloading(RecordingVolume):
        def reload(self):
            calls.append("reload")
            if self.fail:
                raise RuntimeError("there are open files")

    ModalVolumeStore(tmp_path, Reloading([])).refresh()
    assert calls == ["reload"]
    with pytest.raises(StoreError, match=r"volume.reload\(\) .* open files"):
        ModalVolumeStore(tmp_path, Reloading([], fail=True)).refresh()


def test_commits_of_one_container_take_turns(tmp_path):
    """torchrun's workers on one node each commit after writing their shard; Modal does
    not document concurrent commits from several processes, so they are serialized."""
    import threading
    import time

    state = {"now": 0, "most": 0}
    guard = threading.Lock()

    class Slow:
        def commit(self):
            with guard:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.05)
            with guard:
                state["now"] -= 1

    stores = [ModalVolumeStore(tmp_path / f"r{i}", Slow()) for i in range(4)]
    threads = [threading.Thread(target=s.commit) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["most"] == 1 and all(s.commits == 1 for s in stores)
