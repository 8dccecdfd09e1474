"""ObjectStore against a real S3-compatible server (moto, server mode, on 127.0.0.1)."""

from __future__ import annotations

import uuid

import pytest
import torch

from trainguard import CheckpointManager
from trainguard.errors import RunDirError
from trainguard.store import open_store
from trainguard.store.base import ExclusiveCreate, Lockable, Retrying
from trainguard.store.object import ObjectStore
from trainguard.testing.store_conformance import StoreConformance


class TestObjectStore(StoreConformance):
    claims = (ExclusiveCreate, Lockable, Retrying)

    @pytest.fixture
    def store(self, s3_env, monkeypatch):
        # A second writer is refused once it sees the holder renew (every ttl / 4); a ttl
        # of 8 s refuses within 2 s and lets the holder's renewal run 6 s late (a loaded
        # machine) before a newcomer would take the lease over.
        monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "8")
        # A prefix of its own: buckets are named after the test and may be reused.
        return ObjectStore(f"s3://{s3_env}/runs/{uuid.uuid4().hex}")

    @pytest.fixture
    def second_view(self, store):
        return ObjectStore(store.url)  # another client, as another process would open


def test_open_store_routes_urls(s3_env):
    store = open_store(f"s3://{s3_env}/x")
    assert isinstance(store, ObjectStore) and store.url == f"s3://{s3_env}/x"


def test_bad_object_url():
    with pytest.raises(ValueError, match="not an object-store URL"):
        ObjectStore("s3:///no-bucket")


def test_checkpoints_in_a_bucket(s3_env):
    mgr = CheckpointManager(f"s3://{s3_env}/run", max_shard_bytes=1 << 20)
    state = {"w": torch.randn(600, 600), "step": 3}
    mgr.save(3, state, blocking=True)
    mgr.save(4, state, blocking=True)
    fresh = {"w": torch.zeros(600, 600), "step": 0}
    assert CheckpointManager(f"s3://{s3_env}/run").restore(fresh) == 4
    assert torch.equal(fresh["w"], state["w"]) and fresh["step"] == 3
    assert mgr.verify(4).valid


def test_cli_takes_store_urls(s3_env):
    from click.testing import CliRunner

    from trainguard.cli import cli

    url = f"s3://{s3_env}/cli-run"
    mgr = CheckpointManager(url)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((10,), float(step))}, metrics={"loss": step})
    mgr.close()
    runner = CliRunner()
    listed = runner.invoke(cli, ["ls", url])
    steps = [line.split()[0] for line in listed.output.splitlines()[1:]]
    assert listed.exit_code == 0 and steps == ["1", "2", "3"]
    assert runner.invoke(cli, ["verify", url]).exit_code == 0
    gc = runner.invoke(cli, ["gc", url, "--keep-last", "1"])
    assert gc.exit_code == 0 and "deleted 2" in gc.output
    assert [c.step for c in CheckpointManager(url).list()] == [3]
    empty = runner.invoke(cli, ["ls", f"s3://{s3_env}/nothing-here"])
    assert empty.exit_code == RunDirError.exit_code and "holds no checkpoints" in empty.output


def test_ls_shows_both_tiers_newest_step(tmp_path, s3_env):
    from click.testing import CliRunner

    from trainguard.cli import cli

    url = f"s3://{s3_env}/tiers"
    mgr = CheckpointManager(tmp_path / "run", mirror=url)
    mgr.save(1, {"w": torch.ones(4)}, blocking=True)
    mgr.close()  # waits for the upload of step 1
    CheckpointManager(tmp_path / "run").save(2, {"w": torch.ones(4)}, blocking=True)  # local only
    result = CliRunner().invoke(cli, ["ls", str(tmp_path / "run"), "--mirror", url])
    assert result.exit_code == 0, result.output
    assert "newest valid step: local 2, mirror 1" in result.output
