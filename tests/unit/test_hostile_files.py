"""Hostile files in a run directory (issue 14, items 4-6): planted symlinks and FIFOs.

trainguard never makes a link or a special file in a run directory, so one found there was
planted: the writer refuses to write through it, readers refuse to read it (and skip the
checkpoint), and nothing blocks on a FIFO.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from tests.unit import hostile
from trainguard import CheckpointManager, keep_last
from trainguard.checkpoint.format import MANIFEST
from trainguard.errors import StoreError
from trainguard.store.lock import FileLock

LOCK = ".trainguard.lock"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("precious")
    return path


# -- item 4: the lock file ---------------------------------------------------------------


def test_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path, victim):
    run = hostile.make_run(tmp_path / "run", steps=(1,))
    (run / LOCK).unlink()
    (run / LOCK).symlink_to(victim)
    mgr = CheckpointManager(run)
    with pytest.raises(StoreError, match="symbolic link"):
        mgr.save(2, hostile.state(2), blocking=True)
    with pytest.raises(StoreError, match="symbolic link"):
        mgr.gc(keep_last(1))
    assert victim.read_text() == "precious"
    assert [i.step for i in mgr.list()] == [1]


def test_file_lock_refuses_a_symlink_even_to_nothing(tmp_path, victim):
    """A dangling link would make O_CREAT create its target, wherever that is."""
    for target in (victim, tmp_path / "not-yet"):
        link = tmp_path / f"lock-to-{target.name}"
        link.symlink_to(target)
        with pytest.raises(StoreError, match=f"{link}.*symbolic link"):
            FileLock(link).acquire()
    assert victim.read_text() == "precious" and not (tmp_path / "not-yet").exists()


def test_file_lock_refuses_a_fifo(tmp_path):
    path = tmp_path / "lock"
    os.mkfifo(path)
    with pytest.raises(StoreError, match="not a regular file"):
        FileLock(path).acquire()


def test_temp_files_are_never_opened_through_a_link(tmp_path, victim, monkeypatch):
    """Even a link planted at the exact temp name a writer picks is not followed."""
    from trainguard.store import local

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(local.secrets, "token_hex", lambda n: "feedbeef")
    (run / f"{local.TMP_PREFIX}x.{os.getpid()}.feedbeef").symlink_to(victim)
    with pytest.raises(StoreError):
        local.LocalStore(run).write("x", b"evil")
    assert victim.read_text() == "precious"


# -- item 5: FIFOs ---------------------------------------------------------------------


def _finishes(fn, path):
    """Run ``fn`` in a thread; if it blocks on the FIFO at ``path``, unblock and fail."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # checked by the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)  # a hang guard only: the fixed code never opens the FIFO for reading
    if thread.is_alive():
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # a writer lets the reader go
        os.close(fd)
        thread.join(60)
        pytest.fail(f"blocked reading the FIFO {path}")
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_fifo_as_manifest_is_skipped_not_waited_for(tmp_path):
    run = hostile.make_run(tmp_path / "run")
    manifest = hostile.step_path(run, 2) / MANIFEST
    manifest.unlink()
    os.mkfifo(manifest)
    mgr = CheckpointManager(run)
    infos = _finishes(mgr.list, manifest)
    assert [i.valid for i in infos] == [True, False]
    assert "not a regular file" in infos[1].problem
    assert _finishes(lambda: mgr.restore(hostile.blank()), manifest) == 1


def test_fifo_as_member_is_skipped_not_waited_for(tmp_path):
    """The manifest says the file is empty, so the size check alone does not catch it."""
    run = hostile.make_run(tmp_path / "run")
    state = hostile.member(run, 2, "state")
    hostile.rewrite_member(run, 2, state, b"")
    state.unlink()
    os.mkfifo(state)
    mgr = CheckpointManager(run)
    info = _finishes(lambda: mgr.verify(2), state)
    assert not info.valid and "not a regular file" in info.problem and state.name in info.problem
    assert _finishes(lambda: mgr.restore(hostile.blank()), state) == 1


# -- item 6: links inside a checkpoint ---------------------------------------------------


@pytest.mark.parametrize("kind", ["state", "shard"])
def test_member_that_links_outside_the_run_is_never_read(tmp_path, kind):
    """The link's target holds the very bytes the manifest expects: still refused."""
    run = hostile.make_run(tmp_path / "run")
    inside = hostile.member(run, 2, kind)
    outside = tmp_path / "outside" / inside.name
    outside.parent.mkdir()
    shutil.copy(inside, outside)
    inside.unlink()
    inside.symlink_to(outside)
    mgr = CheckpointManager(run)
    info = mgr.list()[1]
    assert not info.valid and "symbolic link" in info.problem and inside.name in info.problem
    assert not mgr.verify(2).valid
    assert mgr.restore(hostile.blank()) == 1
    mgr.gc(keep_last(1))  # deleting the doomed step removes the link, not its target
    assert outside.exists() and not inside.is_symlink()


def test_manifest_that_links_outside_the_run_is_never_read(tmp_path):
    run = hostile.make_run(tmp_path / "run")
    inside = hostile.step_path(run, 2) / MANIFEST
    outside = tmp_path / "manifest-copy.json"
    shutil.copy(inside, outside)
    inside.unlink()
    inside.symlink_to(outside)
    mgr = CheckpointManager(run)
    assert "symbolic link" in mgr.list()[1].problem
    assert mgr.restore(hostile.blank()) == 1


def test_step_directory_that_links_outside_is_neither_read_nor_written(tmp_path, victim):
    """A linked step directory is invisible to readers, and a save there refuses to
    write (or to clear "leftovers") through the link."""
    run = hostile.make_run(tmp_path / "run", steps=(1,))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(victim, elsewhere / "tensors-00000.safetensors")
    hostile.step_path(run, 3).symlink_to(elsewhere, target_is_directory=True)
    mgr = CheckpointManager(run)
    assert [i.step for i in mgr.list()] == [1]
    with pytest.raises(StoreError, match="symbolic link"):
        mgr.save(3, hostile.state(3), blocking=True)
    mgr.close()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["tensors-00000.safetensors"]
    assert (elsewhere / "tensors-00000.safetensors").read_text() == "precious"

