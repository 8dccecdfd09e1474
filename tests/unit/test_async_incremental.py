"""Asynchronous saves (snapshot, then background write) and incremental saves."""

from __future__ import annotations

import pytest
import torch

from trainguard import CheckpointError, CheckpointExists, CheckpointManager, keep_last
from trainguard.store import LocalStore


def _big_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": {f"t{i}": torch.randn(512, 512, generator=gen) for i in range(8)}, "n": seed}


def _zeros_like(state: dict) -> dict:
    return {"w": {k: torch.zeros_like(v) for k, v in state["w"].items()}, "n": -1}


def test_mutating_right_after_save_returns_does_not_change_what_is_saved(tmp_path):
    state = _big_state()
    expected = {k: v.clone() for k, v in state["w"].items()}
    mgr = CheckpointManager(tmp_path, max_shard_bytes=1 << 20)
    handle = mgr.save(1, state)
    for tensor in state["w"].values():  # the loop goes on at once
        tensor.add_(1.0)
    info = handle.wait()
    assert info.step == 1 and handle.done() and handle.seconds_to_durable is not None
    target = _zeros_like(state)
    mgr.restore(target)
    for key, tensor in expected.items():
        assert torch.equal(target["w"][key], tensor)


def test_host_arena_is_reused_across_saves(tmp_path):
    mgr = CheckpointManager(tmp_path)
    state = _big_state()
    mgr.save(1, state).wait()
    pointer, capacity = mgr.writer.arena._buffer.data_ptr(), mgr.writer.arena.capacity
    mgr.save(2, state).wait()
    assert (mgr.writer.arena._buffer.data_ptr(), mgr.writer.arena.capacity) == (pointer, capacity)
    assert capacity < 1.01 * sum(t.numel() * 4 for t in state["w"].values()) + 4096


class FailingStore(LocalStore):
    """A LocalStore whose tensor-shard writes fail (disk full, network gone...)."""

    fail_steps = {2, 4}

    def write(self, key, data):
        if key.endswith(".safetensors") and any(f"step-{s:09d}/" in key for s in self.fail_steps):
            raise OSError(28, "No space left on device")
        return super().write(key, data)


def test_background_error_surfaces_once_and_previous_stays_latest(tmp_path, caplog):
    store = FailingStore(tmp_path)
    mgr = CheckpointManager(store)
    mgr.save(1, _big_state(1)).wait()
    handle = mgr.save(2, _big_state(2))  # the snapshot succeeds; the write fails later
    with pytest.raises(CheckpointError, match="save of step 2 failed.*No space left"):
        handle.wait()
    assert "save of step 2 failed" in caplog.text  # logged when it happened
    assert mgr.latest_valid().step == 1
    mgr.save(3, _big_state(3)).wait()  # reported once through the handle: not again

    mgr.save(4, _big_state(4))  # nobody waits on this handle...
    with pytest.raises(CheckpointError, match="background save failed"):
        mgr.save(5, _big_state(5))  # ...so the next call raises it
    mgr.save(5, _big_state(5), blocking=True)
    assert [c.step for c in mgr.list() if c.valid] == [1, 3, 5]

    store.fail_steps = {6}
    handle = mgr.save(6, _big_state(6))
    mgr.list()  # something drains the save first (a user's ls, latest_valid...)
    with pytest.raises(CheckpointError, match="save of step 6 failed"):
        handle.wait()  # the handle still reports it...
    mgr.save(7, _big_state(7)).wait()  # ...and the next save does not raise it again
    assert [c.step for c in mgr.list() if c.valid] == [1, 3, 5, 7]


def test_skip_policy_skips_while_a_save_is_in_flight(tmp_path):
    mgr = CheckpointManager(tmp_path, if_busy="skip")
    first = mgr.save(1, _big_state())
    second = mgr.save(2, _big_state())
    if first.done():
        pytest.skip("the first save finished before the second call (machine too fast)")
    assert second.skipped and second.wait() is None
    mgr.wait()
    assert [c.step for c in mgr.list()] == [1]


def _frozen_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(4096, 256), torch.nn.Linear(256, 256),
                                torch.nn.Linear(256, 16))
    for p in model[0].parameters():
        p.requires_grad_(False)  # a frozen base: ~90% of the bytes
    return model


def _train(model, opt, steps=2):
    for _ in range(steps):
        loss = model(torch.randint(0, 4096, (8,))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_incremental_save_skips_frozen_tensors_and_restores_after_gc(tmp_path):
    model = _frozen_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mgr = CheckpointManager(tmp_path, incremental=True, keep=keep_last(1))
    state = {"model": model, "optimizer": opt}
    full = mgr.save(1, state).wait()
    sizes = [full.manifest.total_bytes]
    for step in (2, 3, 4):
        _train(model, opt)
        info = mgr.save(step, state).wait()
        sizes.append(info.manifest.total_bytes)
        assert [r.step for r in info.manifest.refs] == [1]  # frozen bytes come from step 1
    assert max(sizes[1:]) <= 0.15 * sizes[0], sizes
    # keep_last(1) deleted checkpoints 1-3, but step 1's shard is still referenced.
    assert [c.step for c in mgr.list()] == [4]
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _frozen_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert CheckpointManager(tmp_path).restore({"model": fresh, "optimizer": opt}) == 4
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert mgr.verify(4).valid


def test_incremental_sees_writes_that_bypass_the_version_counter(tmp_path):
    model = _frozen_model()
    mgr = CheckpointManager(tmp_path, incremental=True)
    mgr.save(1, {"model": model}, blocking=True)
    model[0].weight.data.mul_(0.5)  # .data writes do not bump torch's version counter
    info = mgr.save(2, {"model": model}).wait()
    assert info.manifest.total_bytes >= 4096 * 256 * 4  # the change was seen: rewritten
    fresh = _frozen_model()
    mgr.restore({"model": fresh})
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_gc_sweeps_retired_files_once_nothing_references_them(tmp_path):
    model = _frozen_model()
    mgr = CheckpointManager(tmp_path, incremental=True)
    state = {"model": model}
    for step in (1, 2, 3):
        mgr.save(step, state, blocking=True)
    mgr.gc(keep_last(1))
    assert (tmp_path / "checkpoints" / "step-000000001" / "retired.json").exists()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # everything changes: the next save is full, references nothing
    mgr.save(4, state, blocking=True)
    mgr.gc(keep_last(1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000004"]


def test_fingerprint_of_tensors_past_float32_exact_indices():
    from trainguard.checkpoint.snapshot import fingerprints

    big = torch.zeros(2**24 + 3, dtype=torch.uint8)
    before = fingerprints([big])
    big[-1] = 7  # the last element is always sampled
    assert fingerprints([big]) != before


def test_incremental_never_trusts_tensors_built_for_the_save(tmp_path):
    """A numpy array is copied into a new tensor at each save: no version history, and the
    copy may land at the freed address of the last one. It must always be rewritten."""
    import numpy as np

    array = np.zeros(100_000, dtype=np.float32)
    mgr = CheckpointManager(tmp_path, incremental=True)
    for step in range(1, 5):
        array[12345] = step  # a position the 64-element fingerprint does not sample
        mgr.save(step, {"a": array}, blocking=True)
    out = {"a": None}
    mgr.restore(out)
    assert out["a"][12345] == 4


def test_a_retired_directory_is_never_overwritten(tmp_path):
    model = _frozen_model()
    mgr = CheckpointManager(tmp_path, incremental=True, keep=keep_last(1))
    for step in (1, 2):
        mgr.save(step, {"model": model}, blocking=True)
    assert (tmp_path / "checkpoints" / "step-000000001" / "retired.json").exists()
    mgr.close()
    with pytest.raises(CheckpointExists, match="still read"):
        CheckpointManager(tmp_path).save(1, {"model": model})  # e.g. a fresh start
    assert mgr.verify(2).valid


def test_prepare_reserves_the_arena_the_first_save_uses(tmp_path):
    """prepare() allocates in the background; the first save copies into that very
    buffer (no allocation inside the save) and still saves the right values."""
    model = torch.nn.Linear(256, 256)
    mgr = CheckpointManager(str(tmp_path))
    mgr.prepare({"model": model})
    mgr.writer.arena._adopt_reserved()  # wait for the background allocation
    reserved = mgr.writer.arena._buffer
    assert reserved is not None and mgr.writer.arena.capacity >= 256 * 257 * 4
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.save(1, {"model": model}).wait()
    assert mgr.writer.arena._buffer.data_ptr() == reserved.data_ptr()
    target = torch.nn.Linear(256, 256)
    assert mgr.restore({"model": target}) == 1
    for key, value in target.state_dict().items():
        assert torch.equal(value, expected[key])
    mgr.close()
    assert mgr.writer.arena._buffer is None  # close gives the host copy back
