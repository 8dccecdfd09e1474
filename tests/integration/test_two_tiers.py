"""Two tiers: local disk first, then a bucket in the background, through real HTTP faults."""

from __future__ import annotations

import pytest
import torch

from tests.faultproxy import FaultProxy
from tests.integration.jobcli import wait_for
from trainguard import CheckpointManager, keep_last
from trainguard.store.object import ObjectStore


@pytest.fixture
def proxy(s3_server, s3_env, monkeypatch):
    fault_proxy = FaultProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    yield fault_proxy
    fault_proxy.stop()


def _state(step: int) -> dict:
    return {"w": torch.full((300, 300), float(step)), "step": step}


def _remote(bucket: str) -> ObjectStore:
    # Few retries inside obstore, so that faults reach trainguard's own retry loop too.
    return ObjectStore(f"s3://{bucket}/run", max_retries=1, retry_timeout=5)


def test_upload_faults_are_retried_and_the_bucket_catches_up(tmp_path, s3_env, proxy):
    mgr = CheckpointManager(tmp_path / "run", mirror=_remote(s3_env), keep=keep_last(2),
                            max_shard_bytes=128 << 10)
    mgr.mirror.initial_delay = 0.05
    proxy.fail_next(12, "503")
    proxy.fail_next(6, "drop")
    for step in range(1, 6):
        handle = mgr.save(step, _state(step))
        handle.wait()  # the local commit never waits for the bucket
    assert mgr.list()[-1].step == 5 and mgr.list()[-1].valid
    assert mgr.mirror.drain(timeout=60), mgr.mirror.last_error
    assert proxy.faults == 18
    assert mgr.tiers() == {"primary": 5, "mirror": 5}
    remote = CheckpointManager(_remote(s3_env))
    assert remote.verify(5).valid
    # Uploads that fell behind skip superseded checkpoints: only the newest is needed.
    assert [c.step for c in remote.list() if c.valid][-1] == 5
    for step in (6, 7):
        mgr.save(step, _state(step), blocking=True)
        assert mgr.mirror.drain(timeout=60)
    assert [c.step for c in remote.list()] == [6, 7]  # the same retention, remotely
    mgr.close()


def test_a_remote_checkpoint_without_its_manifest_is_invisible(tmp_path, s3_env, proxy):
    mgr = CheckpointManager(tmp_path / "run", mirror=_remote(s3_env))
    mgr.mirror.initial_delay = 0.05
    mgr.save(1, _state(1), blocking=True)
    assert mgr.mirror.drain(timeout=60)
    proxy.block("step-000000002/manifest.json")  # the data lands, the manifest never does
    mgr.save(2, _state(2), blocking=True)
    remote = CheckpointManager(_remote(s3_env))
    # wait until step 2's data is in the bucket (not its manifest)
    wait_for(lambda: remote.list()[-1].step == 2, what="step 2's data in the bucket")
    assert remote.latest_valid().step == 1 and not remote.list()[-1].valid
    fresh = {"w": torch.zeros(300, 300), "step": 0}
    assert remote.restore(fresh) == 1 and fresh["step"] == 1
    proxy.unblock()
    assert mgr.mirror.drain(timeout=60)
    assert remote.latest_valid().step == 2
    mgr.close()


def test_a_fresh_machine_restores_from_the_bucket(tmp_path, s3_env, proxy):
    first = CheckpointManager(tmp_path / "a", mirror=_remote(s3_env))
    for step in (10, 20):
        first.save(step, _state(step))
    first.close()  # waits for the upload
    fresh_dir = tmp_path / "b"  # nothing on local disk
    second = CheckpointManager(fresh_dir, mirror=_remote(s3_env))
    latest = second.latest_valid()
    assert latest.step == 20 and latest.tier == "mirror"
    state = {"w": torch.zeros(300, 300), "step": 0}
    assert second.restore(state) == 20 and torch.equal(state["w"], _state(20)["w"])
    second.save(30, _state(30), blocking=True)
    assert second.tiers()["primary"] == 30
    second.close()
    assert CheckpointManager(_remote(s3_env)).latest_valid().step == 30
