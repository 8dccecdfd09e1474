"""Sharded (DCP) checkpoints in one process: format, verify, corruption, restore; and
the torchrun command a JobSpec builds."""

from __future__ import annotations

import json

import pytest
import torch

from trainguard.checkpoint import CheckpointManager
from trainguard.checkpoint.distributed import (
    DCP_METADATA,
    is_sharded,
    save_state_sharded,
)
from trainguard.launch.spec import JobSpec
from trainguard.launch.torchrun import TorchrunConfig
from trainguard.store import LocalStore


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(4, 3), "extra": torch.randn(7),
            "counters": {"seen": seed}}


def _saved(tmp_path, step: int = 5) -> CheckpointManager:
    manifest = save_state_sharded(LocalStore(tmp_path), step, _state(0), metrics={"loss": 0.5})
    assert manifest is not None and is_sharded(manifest)
    return CheckpointManager(tmp_path)


def test_sharded_checkpoint_lists_verifies_and_restores(tmp_path):
    mgr = _saved(tmp_path)
    info = mgr.latest_valid()
    assert info.step == 5 and info.metrics == {"loss": 0.5}
    assert {DCP_METADATA, "state.json", "rank00000.distcp"} <= set(info.manifest.files)
    assert mgr.verify(5).valid
    target = _state(1)
    assert mgr.restore(target) == 5
    ref = _state(0)
    assert torch.equal(target["model"].weight, ref["model"].weight)
    assert torch.equal(target["extra"], ref["extra"]) and target["counters"] == {"seen": 0}
    meta = json.loads((tmp_path / "checkpoints/step-000000005" / DCP_METADATA).read_text())
    assert meta["format"] == "trainguard.dcp"  # JSON, not DCP's pickle


@pytest.mark.parametrize("name", ["rank00000.distcp", DCP_METADATA])
def test_corrupt_sharded_file_fails_verify_and_is_skipped(tmp_path, name):
    mgr = _saved(tmp_path, 5)
    save_state_sharded(LocalStore(tmp_path), 3, _state(3))
    path = tmp_path / "checkpoints/step-000000005" / name
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
