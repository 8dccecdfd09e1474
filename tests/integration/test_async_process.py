"""Background saves in real processes: a normal exit commits the in-flight save; kill -9
during the background write leaves the previous checkpoint as the latest valid one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch

from trainguard import CheckpointManager

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from trainguard import CheckpointManager
    from trainguard.store import LocalStore

    class SlowStore(LocalStore):  # a slow disk: every tensor shard takes 0.3 s more
        def write(self, key, data):
            if key.endswith(".safetensors") and "step-000000002" in key:
                time.sleep(0.3)
            return super().write(key, data)

    mgr = CheckpointManager(SlowStore(sys.argv[1]), max_shard_bytes=1 << 20)
    mgr.save(1, {"w": torch.full((1 << 18,), 1.0)}, blocking=True)
    handle = mgr.save(2, {"w": torch.full((1 << 20,), 2.0)})
    print("returned", handle.done(), flush=True)
    # the script ends here without waiting: a normal exit must still commit step 2
""")


def _start(run_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _value_of_latest(run_dir) -> tuple[int, float]:
    mgr = CheckpointManager(run_dir)
    latest = mgr.latest_valid()
    assert mgr.verify(latest.step).valid
    state = {"w": torch.zeros(1 << 20 if latest.step == 2 else 1 << 18)}
    mgr.restore(state)
    return latest.step, float(state["w"].unique().item())


def test_normal_exit_commits_the_in_flight_save(tmp_path):
    proc = _start(tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "returned False"  # save returned before its commit
    assert _value_of_latest(tmp_path) == (2, 2.0)


def test_kill9_during_background_write_keeps_previous_latest(tmp_path):
    proc = _start(tmp_path)
    try:
        assert proc.stdout.readline().strip() == "returned False", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _value_of_latest(tmp_path) == (1, 1.0)
    assert [c.step for c in CheckpointManager(tmp_path).list() if c.valid] == [1]
