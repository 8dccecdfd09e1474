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


def test_second_writer_is_refused_while_the_first_renews(s3_env, monkeypatch):
    # The second writer is refused once it sees a renewal (every ttl / 4: 2 s here); with
    # the 1.2 s ttl, a renewal held up 0.9 s on a loaded machine let it take the lease.
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "8")
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


@pytest.fixture
def proxy(s3_server, s3_env, monkeypatch):
    """A fault-injecting proxy in front of the S3 server; obstore talks to the proxy."""
    from tests.faultproxy import FaultProxy

    fault_proxy = FaultProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    yield fault_proxy
    fault_proxy.stop()


def test_renewal_whose_answer_was_lost_recognises_its_own_lease(s3_env, proxy, monkeypatch):
    """The renewal PUT lands, its answer is lost, obstore retries it and the retry's
    precondition fails (the ETag is already the new one): the lease is still ours."""
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "600")  # no background renewal meanwhile
    store = ObjectStore(f"s3://{s3_env}/run")
    lease = store.lock(".trainguard.lock").acquire()
    proxy.fail_next(1, "lost", match=".trainguard.lock", method="PUT")
    assert lease.renew() is True and lease.held
    assert proxy.faults == 1  # the answer really was lost
    lease.acquire()  # a save's acquire: no LockHeld
    assert lease.renew() is True  # and the ETag it adopted is the current one
    lease.release()
    assert not store.exists(".trainguard.lock")


def test_renewal_after_the_lease_was_deleted_is_lost_not_an_error(s3_env, monkeypatch):
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "600")
    store = ObjectStore(f"s3://{s3_env}/run")
    lease = store.lock(".trainguard.lock").acquire()
    store.delete(".trainguard.lock")  # e.g. a human cleaning up
    assert lease.renew() is False and not lease.held
    with pytest.raises(LockHeld, match="lost its writer lease"):
        lease.acquire()


def test_a_writer_that_lost_its_lease_deletes_nothing(s3_env, short_ttl):
    """Retention checks the lease right before deleting: a writer cut off past the ttl
    (its renewals stopped) prunes nothing of the new holder's run."""
    from trainguard import keep_last

    url = f"s3://{s3_env}/run"
    old = CheckpointManager(url)
    old.save(1, {"w": torch.ones(3)}, blocking=True)
    old.guard.lock._stop.set()  # cut off from the store: no renewals
    old.guard.lock._renewer.join()
    new = CheckpointManager(url)
    new.save(2, {"w": torch.zeros(3)}, blocking=True)  # takes over after the ttl
    with pytest.raises(LockHeld, match="lost its writer lease"):
        old.gc(keep_last(1))
    assert [(i.step, i.valid) for i in new.list()] == [(1, True), (2, True)]
    new.close()
