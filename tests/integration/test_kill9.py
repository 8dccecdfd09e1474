"""kill -9 of a saving process at random instants never leaves a checkpoint that loads
wrongly, and never loses one that was reported committed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.integration.saver import empty_state, state_for
from trainguard import CheckpointManager

ROOT = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("TRAINGUARD_KILL_TRIALS", "50"))


def _run_and_kill(run_dir: Path, delay: float) -> list[int]:
    """Start a saver, kill -9 it ``delay`` seconds after it is ready; return the steps it
    reported committed."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.saver", str(run_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


def test_kill9_at_random_instants(tmp_path):
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    highest_reported = -1
    for trial in range(TRIALS):
        reported = _run_and_kill(run_dir, delay=rng.uniform(0.0, 0.4))
        highest_reported = max([highest_reported, *reported])
        mgr = CheckpointManager(run_dir)
        latest = mgr.latest_valid()
        if highest_reported < 0 and latest is None:
            continue  # killed before its first save committed: nothing to check yet
        assert latest is not None, f"trial {trial}: committed {highest_reported}, none valid"
        # nothing reported committed is ever lost (a later, unreported commit may exist)
        assert latest.step >= highest_reported, (trial, latest.step, highest_reported)
        assert mgr.verify(latest.step).valid, mgr.verify(latest.step).problem
        target = empty_state()
        assert mgr.restore(target) == latest.step
        expected = state_for(latest.step)
        assert target["step"] == latest.step and target["meta"] == expected["meta"]
        for name, tensor in expected["tensors"].items():
            assert torch.equal(target["tensors"][name], tensor), (trial, name)
    assert highest_reported >= 0, "no save ever committed: the kills came too early"
