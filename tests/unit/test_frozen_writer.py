"""A writer that lost its lease never tears the new holder's checkpoints (issue 14, item 10).

Writer A (a real process) freezes itself (SIGSTOP) in the middle of saving step 2, past
the lease ttl. Writer B takes the lease over and commits steps 2 and 3. A resumes. Whatever
A does next, B's checkpoints stay byte for byte what B committed, and A reports no commit.

This holds by construction, not by timing: every save writes files under names unique to
it (the manifest names them), so A cannot overwrite B's files; a manifest is published
with a create that never overwrites, so A cannot replace B's; and a save checks its lease
right before publishing. The ``publish`` case freezes A *after* that lease check, where
only the first two guarantees are left to protect B.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainguard import CheckpointManager
from trainguard.checkpoint.format import MANIFEST
from trainguard.store.object import ObjectStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, "tests", "unit", "frozen_writer_child.py")
TTL = "1.5"


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


def _expect(proc, wanted: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == wanted:
            return lines
    raise AssertionError(f"writer A exited before {wanted!r}: {lines}\n{proc.stderr.read()}")


def _snapshot(store: ObjectStore, steps) -> dict[str, bytes]:
    """Every object of B's checkpoints at ``steps``: the manifest and the files it names."""
    out = {}
    for step in steps:
        key = f"checkpoints/step-{step:09d}"
        info = next(i for i in CheckpointManager(store).list() if i.step == step)
        for name in [MANIFEST, *info.manifest.files]:
            out[f"{key}/{name}"] = bytes(store.read(f"{key}/{name}"))
    return out


@pytest.mark.parametrize("point", ["midsave", "publish"])
def test_frozen_writer_never_tears_the_new_holders_checkpoints(s3_env, monkeypatch, point):
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", TTL)
    url = f"s3://{s3_env}/run-{point}"  # the bucket name is cut short: one per case
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    writer_a = subprocess.Popen([sys.executable, CHILD, url, point], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)
    writer_b = None
    try:
        _expect(writer_a, "FROZEN")
        while not _stopped(writer_a.pid):  # it stops itself right after that line
            time.sleep(0.01)
        # B: takes the lease over once it has gone unrenewed for a ttl, then commits.
        writer_b = CheckpointManager(url)
        target = {"w": torch.zeros(64)}
        assert writer_b.restore(target) == 1
        for step in (2, 3):
            writer_b.save(step, {"w": torch.full((64,), float(step))}, blocking=True)
        store = ObjectStore(url)
        before = _snapshot(store, (2, 3))

        os.kill(writer_a.pid, signal.SIGCONT)
        out, err = writer_a.communicate(timeout=120)
        lines = out.split()
        assert "COMMITTED" not in lines, out + err
        # midsave: stopped by its lease check; publish: past it, stopped by the create
        # that would not replace B's manifest.
        why = {"midsave": "LockHeld", "publish": "CheckpointExists"}[point]
        assert "FAILED" in out and why in out, out + err

        assert _snapshot(store, (2, 3)) == before  # not one byte of B's changed
        reader = CheckpointManager(url)
        assert [(i.step, i.valid) for i in reader.list()] == [(1, True), (2, True), (3, True)]
        for step in (2, 3):
            assert reader.verify(step).valid
            target = {"w": torch.zeros(64)}
            assert reader.restore(target, step=step) == step
            assert torch.equal(target["w"], torch.full((64,), float(step)))
    finally:
        if writer_b is not None:
            writer_b.close()
        if writer_a.poll() is None:
            writer_a.kill()
            writer_a.wait()
