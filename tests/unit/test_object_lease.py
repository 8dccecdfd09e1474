"""The object-store writer lease, against a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainguard import CheckpointManager
from trainguard.errors import LockHeld
from trainguard.store.object import ObjectStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def short_ttl(monkeypatch):
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "1.2")


def test_second_writer_is_refused_while_the_first_renews(s3_env, short_ttl):
    url = f"s3://{s3_env}/run"
    first = CheckpointManager(url)
    first.save(1, {"w": torch.ones(3)}, blocking=True)  # takes the lease
    second = CheckpointManager(url)
    with pytest.raises(LockHeld, match="renews its lease"):
        second.save(2, {"w": torch.zeros(3)}, blocking=True)
    assert [i.step for i in second.list()] == [1]  # nothing of the refused writer's
    first.close()  # releases: the next writer gets it at once
    second.save(2, {"w": torch.zeros(3)}, blocking=True)
    second.close()


def test_a_holder_that_stops_renewing_loses_the_lease_after_ttl(s3_env, short_ttl):
    store = ObjectStore(f"s3://{s3_env}/run")
    # A lease left by a process on another host that died: nobody renews it.
    store.write(".trainguard.lock", json.dumps({"holder": "x", "pid": 1, "host": "gone"}).encode())
    start = time.monotonic()
    lease = store.lock(".trainguard.lock").acquire()
    waited = time.monotonic() - start
    assert lease.held and waited >= 1.2  # watched it for a whole ttl first
    record = json.loads(bytes(store.read(".trainguard.lock")))
    assert record["pid"] == os.getpid()
    lease.release()
    assert not store.exists(".trainguard.lock")


def test_a_lease_taken_over_is_lost_by_its_old_holder(s3_env, short_ttl):
    store = ObjectStore(f"s3://{s3_env}/run")
    old = store.lock(".trainguard.lock").acquire()
    old._stop.set()  # simulate a holder cut off from the store: it stops renewing
    old._renewer.join()
    new = store.lock(".trainguard.lock").acquire()  # takes over after the ttl
    assert new.held
    assert old.renew() is False and not old.held
    with pytest.raises(LockHeld, match="lost its writer lease"):
        old.acquire()
    new.release()


def test_killed_holder_on_this_host_is_taken_over_at_once(s3_env, monkeypatch):
    """kill -9 of a real writer process: no release, but same host and pid gone."""
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "600")  # waiting out the ttl would fail
    url = f"s3://{s3_env}/run"
    code = ("import sys, time, torch; from trainguard import CheckpointManager;"
            f"m = CheckpointManager({url!r}); m.save(1, {{'w': torch.ones(2)}}, blocking=True);"
            "print('saved', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        mgr = CheckpointManager(url)
        start = time.monotonic()
        mgr.save(2, {"w": torch.zeros(2)}, blocking=True)
        assert time.monotonic() - start < 60
        assert [i.step for i in mgr.list()] == [1, 2]
        mgr.close()
    finally:
        proc.kill()
