"""Sharded (DCP) checkpoints in one process: format, verify, corruption, restore,
background saves (and the DistributedManager's handling of them, in a world of one); and
the torchrun command a JobSpec builds."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from trainguard.checkpoint import CheckpointManager
from trainguard.checkpoint.dcp import (
    DCP_METADATA,
    TrainguardWriter,
    is_sharded,
    save_state_sharded,
)
from trainguard.checkpoint.dcp_background import HostStager, start_save_state_sharded
from trainguard.errors import CheckpointError
from trainguard.launch.spec import JobSpec
from trainguard.launch.torchrun import TorchrunConfig
from trainguard.run.distributed import DistributedManager
from trainguard.store import LocalStore


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(4, 3), "extra": torch.randn(7),
            "counters": {"seen": seed}}


def _saved(tmp_path, step: int = 5) -> CheckpointManager:
    manifest = save_state_sharded(LocalStore(tmp_path), step, _state(0), metrics={"loss": 0.5})
    assert manifest is not None and is_sharded(manifest)
    return CheckpointManager(tmp_path)


def test_each_rank_commits_its_file_before_the_manifest_is_written(tmp_path):
    """A store whose commit is per machine (a Modal volume on each node of a cluster):
    the rank file must be committed before the coordinator writes the manifest."""
    events = []

    class Recording(LocalStore):
        def write(self, key, data):
            super().write(key, data)
            events.append(("write", key.rsplit("/", 1)[-1]))

        def create(self, key, data):  # how the manifest is published
            super().create(key, data)
            events.append(("write", key.rsplit("/", 1)[-1]))

        def commit(self):
            super().commit()
            events.append(("commit", None))

    save_state_sharded(Recording(tmp_path), 5, _state(0))
    rank_file = next(i for i, (op, key) in enumerate(events) if key and key.endswith(".distcp"))
    manifest = events.index(("write", "manifest.json"))
    assert ("commit", None) in events[rank_file + 1:manifest]


def test_sharded_checkpoint_lists_verifies_and_restores(tmp_path):
    mgr = _saved(tmp_path)
    info = mgr.latest_valid()
    assert info.step == 5 and info.metrics == {"loss": 0.5}
    names = {info.manifest.name_of(n) for n in (DCP_METADATA, "state.json", "rank00000.distcp")}
    assert names <= set(info.manifest.files) and info.manifest.writer in min(names)
    assert mgr.verify(5).valid
    target = _state(1)
    assert mgr.restore(target) == 5
    ref = _state(0)
    assert torch.equal(target["model"].weight, ref["model"].weight)
    assert torch.equal(target["extra"], ref["extra"]) and target["counters"] == {"seen": 0}
    meta = json.loads((tmp_path / "checkpoints/step-000000005" /
                       info.manifest.name_of(DCP_METADATA)).read_text())
    assert meta["format"] == "trainguard.dcp"  # JSON, not DCP's pickle


@pytest.mark.parametrize("name", ["rank00000.distcp", DCP_METADATA])
def test_corrupt_sharded_file_fails_verify_and_is_skipped(tmp_path, name):
    mgr = _saved(tmp_path, 5)
    save_state_sharded(LocalStore(tmp_path), 3, _state(3))
    path = tmp_path / "checkpoints/step-000000005" / mgr.list()[-1].manifest.name_of(name)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert "checksum mismatch" in mgr.verify(5).problem
    target = _state(9)
    assert mgr.restore(target) == 3  # the corrupt step is skipped, never loaded
    assert target["counters"] == {"seen": 3}


def test_uncommitted_sharded_save_does_not_exist(tmp_path):
    mgr = _saved(tmp_path, 5)
    (tmp_path / "checkpoints/step-000000005/manifest.json").unlink()
    assert mgr.latest_valid() is None


def test_torchrun_command_and_validation(tmp_path):
    (tmp_path / "train.py").write_text("")
    spec = JobSpec("train.py", args=("--lr", "1"), cwd=str(tmp_path),
                   torchrun={"nproc_per_node": 4, "max_restarts": 2})
    assert spec.command[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node"]
    assert spec.command[-3:] == [spec.script, "--lr", "1"]
    assert JobSpec.from_json(spec.to_json()).command == spec.command
    multi = TorchrunConfig(8, nnodes="2", rdzv_endpoint="10.0.0.1:29500").args()
    assert "--rdzv-endpoint" in multi and "--standalone" not in multi
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        TorchrunConfig(8, nnodes="2")
    with pytest.raises(ValueError, match="nproc_per_node"):
        JobSpec("train.py", cwd=str(tmp_path), torchrun={"nproc_per_node": 0})


# -- background sharded saves -----------------------------------------------------------------


@pytest.fixture
def gate(monkeypatch):
    """Holds every rank's write until ``gate.set()``; ``gate.fail`` makes writes raise."""
    opened = threading.Event()
    opened.fail = False
    original = TrainguardWriter.write_data

    def write_data(self, plan, planner):
        if not opened.wait(30):
            raise RuntimeError("the gate was never opened")
        if opened.fail:
            raise RuntimeError("injected write failure")
        return original(self, plan, planner)

    monkeypatch.setattr(TrainguardWriter, "write_data", write_data)
    return opened


def test_background_sharded_save_writes_the_values_of_the_call(tmp_path, gate):
    state = _state(0)
    handle = start_save_state_sharded(LocalStore(tmp_path), 5, state, HostStager())
    assert not handle.done() and handle.seconds_to_durable is None  # the write is held
    with torch.no_grad():
        state["model"].weight.add_(1000.0)
        state["extra"].add_(1000.0)
    gate.set()
    info = handle.wait()
    assert info.step == 5 and info.manifest is not None and handle.seconds_to_durable > 0
    target = _state(1)
    assert CheckpointManager(tmp_path).restore(target) == 5
    ref = _state(0)
    assert torch.equal(target["model"].weight, ref["model"].weight)
    assert torch.equal(target["extra"], ref["extra"])


@pytest.mark.parametrize("fail", [False, True])
def test_torch_without_async_stager_saves_synchronously(tmp_path, monkeypatch, fail):
    """Older torch (async_save without async_stager=): the same interface, blocking."""
    import trainguard.checkpoint.dcp_background as sharded

    monkeypatch.setattr(sharded, "_ASYNC_STAGER", False)
    if fail:
        def write_data(self, plan, planner):
            raise RuntimeError("injected write failure")
        monkeypatch.setattr(TrainguardWriter, "write_data", write_data)
    handle = start_save_state_sharded(LocalStore(tmp_path), 5, _state(0), HostStager())
    assert handle.done()  # nothing left in the background
    if fail:
        with pytest.raises(CheckpointError):
            handle.wait()
        assert CheckpointManager(tmp_path).latest_valid() is None
        return
    assert handle.wait().step == 5
    target = _state(1)
    assert CheckpointManager(tmp_path).restore(target) == 5
    assert torch.equal(target["extra"], _state(0)["extra"])


def test_failed_background_sharded_save_raises_from_wait_and_commits_nothing(tmp_path, gate):
    gate.fail = True
    gate.set()
    handle = start_save_state_sharded(LocalStore(tmp_path), 5, _state(0), HostStager())
    with pytest.raises(CheckpointError, match="injected write failure") as caught:
        handle.wait()
    assert handle.error_reported and caught.value.__cause__ is handle.error
    assert handle.seconds_to_durable is None
    assert CheckpointManager(tmp_path).latest_valid() is None


@pytest.fixture
def world_of_one(tmp_path):
    """An initialized torch.distributed world of one gloo process, and a DTensor state."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0,
                            world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    yield lambda seed: {"w": distribute_tensor(torch.full((4, 3), float(seed)), mesh,
                                               [Shard(0)]), "seen": seed}
    dist.destroy_process_group()


def test_distributed_manager_raises_a_failed_background_save_once(tmp_path, gate,
                                                                  world_of_one):
    mgr = DistributedManager(CheckpointManager(tmp_path / "run"))
    gate.fail = True
    gate.set()
    mgr.save(1, world_of_one(1))
    with pytest.raises(CheckpointError, match="sharded save of step 1 failed"):
        mgr.save(2, world_of_one(2))  # not started: the failure comes first
    gate.fail = False
    assert mgr.save(2, world_of_one(2)).wait().step == 2  # raised once, not again
    gate.fail = True
    with pytest.raises(CheckpointError, match="sharded save of step 3 failed"):
        mgr.save(3, world_of_one(3), blocking=True)
    mgr.save(4, world_of_one(4))
    with pytest.raises(CheckpointError, match="sharded save of step 4 failed"):
        mgr.close()
    assert [i.step for i in CheckpointManager(tmp_path / "run").list() if i.valid] == [2]


def test_distributed_manager_close_and_restore_wait_for_the_save_in_flight(tmp_path, gate,
                                                                          world_of_one):
    mgr = DistributedManager(CheckpointManager(tmp_path / "run"))
    state = world_of_one(3)
    mgr.save(3, state)
    with torch.no_grad():
        state["w"].add_(1000.0)
    gate.set()  # the write is still to happen: restore must wait for its commit
    target = world_of_one(0)
    assert mgr.restore(target) == 3
    assert torch.equal(target["w"].full_tensor(), torch.full((4, 3), 3.0))
    mgr.save(4, world_of_one(4))
    mgr.close()
    assert (tmp_path / "run/checkpoints/step-000000004/manifest.json").exists()


class NodeView(LocalStore):
    """One node's view of a shared volume on a cluster: the shard files written (by
    "other nodes") since the last ``refresh()`` are invisible, as on a Modal volume
    before ``reload()``."""

    def __init__(self, root):
        super().__init__(root)
        self.unseen: set[str] = set()
        self.refreshes = 0

    def write(self, key, data):
        n = super().write(key, data)
        if key.endswith(".distcp"):
            self.unseen.add(key)
        return n

    def list(self, prefix=""):
        return [k for k in super().list(prefix) if k not in self.unseen]

    def refresh(self):
        self.refreshes += 1
        self.unseen.clear()


def test_retention_after_a_sharded_commit_sees_the_other_nodes_files(tmp_path, world_of_one):
    """Without a refresh, rank 0 saw the other nodes' shards as missing, retention
    called the new checkpoint incomplete and deleted it."""
    from trainguard.checkpoint import keep_last

    store = NodeView(tmp_path / "run")
    mgr = DistributedManager(CheckpointManager(store, keep=keep_last(2)))
    for step in (1, 2, 3):
        mgr.save(step, world_of_one(step)).wait()
    assert store.refreshes >= 3
    assert [i.step for i in CheckpointManager(tmp_path / "run").list() if i.valid] == [2, 3]
    newest = CheckpointManager(tmp_path / "run").list()[-1].manifest
    store.unseen.add(f"checkpoints/step-000000003/{newest.name_of('rank00000.distcp')}")
    target = world_of_one(0)
    assert mgr.restore(target) == 3  # refreshed first: step 3 is seen whole
    assert torch.equal(target["w"].full_tensor(), torch.full((4, 3), 3.0))
    mgr.close()


def test_restoring_a_given_step_falls_back_to_the_mirrors_copy(tmp_path, world_of_one):
    """restore(step=N) with a corrupt primary copy of N reads the mirror's copy of N."""
    mgr = DistributedManager(CheckpointManager(tmp_path / "run", mirror=str(tmp_path / "mirror")))
    mgr.save(1, world_of_one(1)).wait()
    mgr.close()  # the upload finishes
    assert (tmp_path / "mirror/checkpoints/step-000000001/manifest.json").exists()
    shard, = (tmp_path / "run/checkpoints/step-000000001").glob("rank00000.*distcp")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    again = DistributedManager(CheckpointManager(tmp_path / "run", mirror=str(tmp_path / "mirror")))
    target = world_of_one(0)
    assert again.restore(target, step=1) == 1
    assert torch.equal(target["w"].full_tensor(), torch.full((4, 3), 1.0))
    again.close()
