"""sync: only verified bytes are copied, and a bad copy never looks committed."""

from __future__ import annotations

import pytest
import torch

from trainguard import CheckpointCorrupt, CheckpointManager
from trainguard.launch import sync_once


def test_sync_copies_and_verifies_then_refuses_rotten_source(tmp_path):
    src, dest = tmp_path / "run", tmp_path / "copy"
    mgr = CheckpointManager(src)
    mgr.save(1, {"w": torch.arange(1000.0)}, blocking=True)
    assert sync_once(str(src), str(dest)).step == 1
    mgr.save(2, {"w": torch.arange(1000.0) * 2}, blocking=True)
    shard, = (src / "checkpoints" / "step-000000002").glob("tensors-00000.*safetensors")
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="does not match its manifest"):
        sync_once(str(src), str(dest))
    copy = CheckpointManager(dest)
    assert [c.step for c in copy.list() if c.valid] == [1]  # step 2 never appears at DEST
    assert copy.verify(1).valid
