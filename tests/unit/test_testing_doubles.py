"""The test doubles trainguard ships (``trainguard.testing``): MemoryStore and FakeClock."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from trainguard import CheckpointManager, keep_last
from trainguard.errors import LockHeld, StoreError
from trainguard.store import open_store
from trainguard.store.base import ExclusiveCreate, Lockable
from trainguard.store.retry import Backoff
from trainguard.testing import FakeClock, MemoryStore
from trainguard.testing.store_conformance import StoreConformance


class TestMemoryStore(StoreConformance):
    claims = (ExclusiveCreate, Lockable)

    @pytest.fixture
    def store(self):
        return MemoryStore()


def _state(value: float) -> dict:
    return {"w": torch.full((64, 8), value), "b": torch.arange(8.0) * value, "step": int(value)}


def test_a_checkpoint_manager_saves_lists_verifies_and_restores_on_a_memory_store():
    store = MemoryStore()
    manager = CheckpointManager(store, keep=keep_last(2))
    for step in (1, 2, 3):
        manager.save(step, _state(float(step)), blocking=True)
    assert [info.step for info in manager.list()] == [2, 3]  # retention kept the last two
    assert all(info.valid for info in manager.list())
    assert manager.verify(3).valid
    manager.close()

    fresh = {"w": torch.zeros(64, 8), "b": torch.zeros(8), "step": 0}
    assert CheckpointManager(store).restore(fresh) == 3  # the newest, by another manager
    assert torch.equal(fresh["w"], torch.full((64, 8), 3.0)) and fresh["step"] == 3
    assert torch.equal(fresh["b"], torch.arange(8.0) * 3)


def test_a_corrupted_object_in_a_memory_store_fails_verification():
    store = MemoryStore()
    manager = CheckpointManager(store)
    manager.save(1, _state(1.0), blocking=True)
    manager.close()
    shard = next(k for k in store.list() if "step-" in k and not k.endswith("manifest.json"))
    data = bytearray(store.read(shard))
    data[-1] ^= 0xFF
    store.write(shard, bytes(data))
    assert not CheckpointManager(store).verify(1).valid


def test_a_second_manager_of_one_memory_store_is_refused_while_the_first_writes():
    store = MemoryStore()
    first = CheckpointManager(store)
    first.save(1, _state(1.0), blocking=True)
    second = CheckpointManager(store)
    with pytest.raises(LockHeld):
        second.save(2, _state(2.0), blocking=True)
    first.close()  # releases the lock: the next writer gets it
    second.save(2, _state(2.0), blocking=True)
    second.close()
    assert [info.step for info in CheckpointManager(store).list()] == [1, 2]


def test_open_store_returns_a_memory_store_as_is():
    store = MemoryStore("memory://unit")
    assert open_store(store) is store and store.url == "memory://unit"
    assert MemoryStore().url != MemoryStore().url  # each names itself apart in messages


def test_importing_trainguard_testing_loads_neither_pytest_nor_torch():
    code = ("import sys, trainguard.testing; "
            "print(sorted(m for m in ('pytest', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- FakeClock -----------------------------------------------------------------------------

def test_sleep_advances_both_clocks_at_once_and_is_recorded():
    clock = FakeClock(start=100.0, wall_start=1_000.0)
    clock.sleep(2.5)
    clock.advance(0.5)
    clock.sleep(0)
    assert (clock.monotonic(), clock.time()) == (103.0, 1_003.0)
    assert clock.sleeps == [2.5, 0.0]  # advance() is not a sleep


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1"])
def test_the_clock_never_goes_back(bad):
    clock = FakeClock()
    with pytest.raises(ValueError):
        clock.sleep(bad)
    with pytest.raises(ValueError):
        clock.advance(bad)
    assert clock.monotonic() == 0.0


def test_sleeps_from_many_threads_add_up():
    clock = FakeClock()

    def sleeper() -> None:
        for _ in range(1000):
            clock.sleep(0.25)

    threads = [threading.Thread(target=sleeper) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clock.monotonic() == 1000.0 and len(clock.sleeps) == 4000


def test_a_backoff_on_a_fake_clock_waits_out_its_budget_without_waiting():
    clock = FakeClock()
    backoff = Backoff(budget=60, first_delay=1, max_delay=16, sleep=clock.sleep,
                      clock=clock.monotonic, seed=0)
    calls = []

    def outage() -> None:
        calls.append(clock.monotonic())
        raise ConnectionError("endpoint down")

    with pytest.raises(StoreError, match="retry budget of 60 s"):
        backoff.call(outage, "cannot write s3://b/k")
    assert sum(clock.sleeps) <= 60 < sum(clock.sleeps) + 16
    assert len(clock.sleeps) > 4 and clock.sleeps[:4] == sorted(clock.sleeps[:4])  # backs off
    assert len(calls) == len(clock.sleeps) + 1
