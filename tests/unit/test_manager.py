"""CheckpointManager: corruption is detected and skipped, manifests are not trusted,
retention keeps exactly the policy's set, one writer at a time."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from trainguard import (
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointManager,
    CheckpointNotFound,
    LockHeld,
    keep_best,
    keep_every,
    keep_last,
)
from trainguard.checkpoint.format import MANIFEST


def _state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=gen), "b": torch.randn(7, generator=gen),
            "step": step}


def _save_steps(path, steps, **kwargs) -> CheckpointManager:
    mgr = CheckpointManager(path, max_shard_bytes=8 << 10, **kwargs)
    for step in steps:
        mgr.save(step, _state(step), metrics={"loss": 1.0 / (step + 1)})
    mgr.wait()
    return mgr


def _files_of_newest(path) -> list:
    newest = sorted((path / "checkpoints").iterdir())[-1]
    return sorted(p for p in newest.iterdir() if p.name != MANIFEST)


def _restored(mgr) -> tuple[int, dict]:
    target = {"w": torch.zeros(64, 64), "b": torch.zeros(7), "step": -1}
    return mgr.restore(target), target


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_file_in_newest_falls_back_to_previous(tmp_path, caplog, damage):
    mgr = _save_steps(tmp_path, [10, 20])
    files = _files_of_newest(tmp_path)
    assert len(files) >= 3  # several shards plus state.json
    for victim in files:
        original = victim.read_bytes()
        if damage == "flip":
            data = bytearray(original)
            data[len(data) // 2] ^= 0x01
            victim.write_bytes(bytes(data))
        else:
            victim.write_bytes(original[: len(original) // 2])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainguard"):
            step, target = _restored(mgr)
        assert step == 10
        assert torch.equal(target["w"], _state(10)["w"]) and target["step"] == 10
        assert "skipping checkpoint step 20" in caplog.text and victim.name in caplog.text
        problem = mgr.verify(20).problem
        assert problem is not None and victim.name in problem
        victim.write_bytes(original)
    assert mgr.verify(20).valid and _restored(mgr)[0] == 20


def test_explicit_step_that_is_corrupt_raises(tmp_path):
    mgr = _save_steps(tmp_path, [1])
    victim = _files_of_newest(tmp_path)[0]
    victim.write_bytes(b"\x00" * victim.stat().st_size)
    with pytest.raises(CheckpointCorrupt, match=victim.name):
        mgr.restore({"w": torch.zeros(64, 64)}, step=1)


def test_directory_without_manifest_does_not_exist_for_readers(tmp_path):
    mgr = _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-000000002" / MANIFEST).unlink()
    assert mgr.latest_valid().step == 1
    assert _restored(mgr)[0] == 1
    assert "incomplete" in mgr.list()[-1].problem


def test_nothing_to_restore(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no valid checkpoint"):
        CheckpointManager(tmp_path).restore({"w": torch.zeros(1)})
    assert CheckpointManager(tmp_path).latest_valid() is None


@pytest.mark.parametrize("evil", ["../step-000000001/state.json", "/etc/passwd", "a/b",
                                  "..", "x\\..\\y"])
def test_manifest_naming_path_outside_its_directory_is_refused(tmp_path, evil):
    mgr = _save_steps(tmp_path, [1, 2])
    manifest_path = tmp_path / "checkpoints" / "step-000000002" / MANIFEST
    doc = json.loads(manifest_path.read_text())
    doc["files"][evil] = {"size": 1, "xxh3_128": "0" * 32}
    manifest_path.write_text(json.dumps(doc))
    info = mgr.list()[-1]
    assert not info.valid and "not a plain file name" in info.problem
    assert _restored(mgr)[0] == 1


def test_existing_step_is_not_overwritten(tmp_path):
    mgr = _save_steps(tmp_path, [5])
    with pytest.raises(CheckpointExists, match="step 5 is already committed"):
        mgr.save(5, _state(6))
    assert _restored(mgr)[1]["step"] == 5


def test_interrupted_save_of_same_step_is_replaced(tmp_path):
    mgr = _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-000000002" / MANIFEST).unlink()  # as if killed
    mgr.save(2, _state(2))
    assert mgr.verify(2).valid and _restored(mgr)[0] == 2


def test_second_writer_is_refused_reader_is_not(tmp_path):
    writer = _save_steps(tmp_path, [1])
    other = CheckpointManager(tmp_path)
    with pytest.raises(LockHeld, match="Only one process may write"):
        other.save(2, _state(2))
    assert other.latest_valid().step == 1  # reading needs no lock
    writer.close()
    other.save(2, _state(2))
    assert other.latest_valid().step == 2


def test_retention_keeps_exactly_the_policy_set(tmp_path):
    # loss = 1/(step+1): best (min loss) is the newest, so use max mode to keep step 1.
    policy = keep_last(2) | keep_every(4) | keep_best(1, "loss", "max")
    mgr = _save_steps(tmp_path, range(1, 11), keep=policy)
    kept = [c.step for c in mgr.list()]
    assert kept == [1, 4, 8, 9, 10]
    assert all(c.valid for c in mgr.list())


def test_gc_never_deletes_newest_and_removes_interrupted_saves(tmp_path):
    mgr = _save_steps(tmp_path, [1, 2, 3])
    (tmp_path / "checkpoints" / "step-000000004").mkdir()
    (tmp_path / "checkpoints" / "step-000000004" / "tensors-00000.safetensors").write_bytes(b"x")
    dry = mgr.gc(keep_best(1, "loss", "max"), dry_run=True)
    assert [c.step for c in dry] == [2, 4] and len(mgr.list()) == 4
    deleted = mgr.gc(keep_best(1, "loss", "max"))
    assert [c.step for c in deleted] == [2, 4]
    assert [c.step for c in mgr.list()] == [1, 3]  # 1 is best, 3 is the newest valid


def test_reaching_a_corrupt_step_again_replaces_it(tmp_path):
    """restore skipped the rotten step 2; training reaches step 2 again and must save."""
    mgr = _save_steps(tmp_path, [1, 2])
    victim = _files_of_newest(tmp_path)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert _restored(mgr)[0] == 1
    mgr.save(2, _state(2), blocking=True)
    assert mgr.verify(2).valid and _restored(mgr)[0] == 2


def test_gc_keeps_the_newest_checkpoint_that_really_verifies(tmp_path):
    mgr = _save_steps(tmp_path, [1, 2])
    victim = _files_of_newest(tmp_path)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # bit rot: same size, the cheap check passes
    victim.write_bytes(bytes(data))
    mgr.gc(keep_last(1))
    assert 1 in [c.step for c in mgr.list()]
    assert _restored(mgr)[0] == 1


def test_a_save_deletes_nothing_retention_sweeps_what_no_manifest_names(tmp_path):
    """A save never deletes in its step directory (the files there may be a live
    writer's); leftovers of interrupted saves go once a kept manifest does not name them."""
    mgr = _save_steps(tmp_path, [1])
    step2 = tmp_path / "checkpoints" / "step-000000002"
    step2.mkdir()
    leftover = step2 / "tensors-00000.0123456789abcdef.safetensors"  # an interrupted save
    leftover.write_bytes(b"partial")
    mgr.save(2, _state(2), blocking=True)
    assert leftover.exists() and mgr.verify(2).valid
    named = set(mgr.list()[-1].manifest.files) | {MANIFEST}
    mgr.gc(keep_last(5))
    assert not leftover.exists()
    assert {p.name for p in step2.iterdir()} == named and mgr.verify(2).valid
