"""What the job CLI tests share: the ``trainguard`` command in a fresh process, and waits
derived from what is observed (never from how fast a process starts)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tg(*args, timeout=180, **kwargs) -> subprocess.CompletedProcess:
    """``python -m trainguard ARGS`` from the repository root; its result, output as text."""
    return subprocess.run([sys.executable, "-m", "trainguard", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def wait_for(predicate, timeout=120.0, what="condition", every=0.2):
    """``predicate()``'s first truthy value, polled every ``every`` s for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def committed_on_signal(run_dir, output: str, signal_name: str = "SIGTERM"):
    """The newest valid checkpoint of ``run_dir``, asserted to be the step the Run said it
    committed on ``signal_name`` (in ``output``, its log). Its reason is ``preempted``, or
    the cadence's when the signal fell right after a cadence save of that very step (the
    Run then has nothing newer to save): which one is a matter of timing, not of
    correctness."""
    from trainguard import CheckpointManager

    latest = CheckpointManager(run_dir).latest_valid()
    said = f"preempted by {signal_name}: step {latest.step} committed"
    assert said in output, output[-3000:]
    return latest
