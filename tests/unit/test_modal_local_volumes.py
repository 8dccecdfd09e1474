"""The local control plane's volumes keep Modal's commit semantics (no processes)."""

from __future__ import annotations

import pytest

from trainguard.testing.modal_local.volumes import Volume


@pytest.fixture
def volume(tmp_path):
    return Volume("vo-1", "runs", tmp_path / "vol")


def test_writes_are_invisible_to_others_until_committed(volume, tmp_path):
    a = volume.mount(tmp_path / "a")
    (a.root / "run").mkdir()
    (a.root / "run" / "ckpt").write_bytes(b"step 1")
    assert volume.entries("", recursive=True) == []  # a reader outside sees nothing yet
    b = volume.mount(tmp_path / "b")
    assert not (b.root / "run" / "ckpt").exists()
    assert a.commit() == 1
    assert volume.read("run/ckpt") == b"step 1"
    assert not (b.root / "run" / "ckpt").exists()  # b's view is stale until it reloads
    b.reload()
    assert (b.root / "run" / "ckpt").read_bytes() == b"step 1"


def test_a_container_that_ends_without_committing_loses_its_writes(volume, tmp_path):
    a = volume.mount(tmp_path / "a")
    (a.root / "kept").write_bytes(b"1")
    a.commit()
    (a.root / "lost").write_bytes(b"2")
    (a.root / "kept").write_bytes(b"changed")
    del a  # the container is gone; its view is never committed
    fresh = volume.mount(tmp_path / "next")
    assert (fresh.root / "kept").read_bytes() == b"1" and not (fresh.root / "lost").exists()


def test_reload_keeps_pending_changes_and_brings_in_other_commits_and_deletes(volume,
                                                                              tmp_path):
    a, b = volume.mount(tmp_path / "a"), volume.mount(tmp_path / "b")
    (a.root / "shared").write_bytes(b"from a")
    (a.root / "old").write_bytes(b"x")
    a.commit()
    b.reload()
    (b.root / "mine").write_bytes(b"pending")  # b's uncommitted change
    (a.root / "old").unlink()
    (a.root / "shared").write_bytes(b"a again")
    a.commit()
    b.reload()
    assert (b.root / "mine").read_bytes() == b"pending"  # still b's, still uncommitted
    assert (b.root / "shared").read_bytes() == b"a again" and not (b.root / "old").exists()
    assert [e[0] for e in volume.entries("", recursive=True)] == ["shared"]
    b.commit()
    assert volume.read("mine") == b"pending"


def test_reads_outside_the_volume_are_refused(volume):
    with pytest.raises(FileNotFoundError):
        volume.read("../../etc/passwd")
