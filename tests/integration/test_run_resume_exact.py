"""A run killed many times (kill -9 at random steps, some in the middle of a save, and
graceful SIGTERM/SIGINT preemptions) and restarted each time ends bit-identical to one
that was never interrupted: weights, optimizer moments, schedule, RNG streams, data
position; and every step it ran, in any attempt, saw the same loss."""

from __future__ import annotations

import os
import random
import signal

import torch

from tests.integration.run_scripts.child import (
    checkpoint_contents,
    events,
    latest_step,
    metric_lines,
    read_until,
    start,
    step_at_least,
)
from trainguard.run import EXIT_RESUME

TOTAL = 40
STEP_SLEEP = ("--step-sleep", "0.02")
# kill -9 after a step, kill -9 inside a save, and the two preemption signals.
PLAN = ["kill", "kill-in-save", "SIGTERM", "kill", "kill-in-save", "SIGINT", "kill",
        "kill-in-save"]


def _interrupt(run_dir, mode: str, target: int, log) -> None:
    if mode == "kill-in-save":
        proc = start(run_dir, *STEP_SLEEP, "--slow-save-from", str(target), stderr_path=log)
        line = read_until(proc, step_at_least("writing", target))
        saving = int(line.split()[1])
        proc.send_signal(signal.SIGKILL)  # the child is inside the save of `saving`
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert latest_step(run_dir) < saving, "a save killed before its manifest was committed"
        return
    proc = start(run_dir, *STEP_SLEEP, stderr_path=log)
    line = read_until(proc, step_at_least("step", target))
    reached = int(line.split()[1])
    if mode == "kill":
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        return
    proc.send_signal(getattr(signal, mode))
    # Within the deadline (25 s by default), with the exit code that means "resume me".
    assert proc.wait(timeout=25) == EXIT_RESUME, log.read_text()[-3000:]
    committed = latest_step(run_dir)
    assert committed >= reached, (mode, committed, reached)
    assert events(run_dir, "preempted")[-1]["signal"] == mode


def test_kill_and_restart_ends_bit_identical(tmp_path):
    reference, resumed, log = tmp_path / "reference", tmp_path / "resumed", tmp_path / "log"
    proc = start(reference, stderr_path=log)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]

    rng = random.Random(int(os.environ.get("TRAINGUARD_KILL_SEED", "20240611")))
    for mode in PLAN:
        # On a loaded machine a kill lands late and the run gets further than planned:
        # never ask for a target it has already passed or cannot reach before the end.
        start_at = min(latest_step(resumed) + 1, TOTAL - 8)
        target = rng.randint(start_at, max(start_at, TOTAL - 8 + PLAN.index(mode) // 2))
        _interrupt(resumed, mode, target, log)
    proc = start(resumed, stderr_path=log)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]

    expected_tree, expected_tensors = checkpoint_contents(reference, TOTAL)
    tree, tensors = checkpoint_contents(resumed, TOTAL)
    assert sorted(tensors) == sorted(expected_tensors)
    assert any(name.startswith("optimizer/") for name in tensors)
    assert any("rng" in name for name in tensors)
    for name, tensor in expected_tensors.items():
        assert torch.equal(tensors[name], tensor), f"{name} differs after the restarts"
    assert tree == expected_tree  # data position, schedule, counters: identical too

    # Every step any attempt ran (steps after a kill are run again) saw the same loss.
    losses = {line["step"]: line["loss"] for line in metric_lines(reference)}
    replayed = metric_lines(resumed)
    assert len(replayed) > TOTAL, "no step was ever re-run: the kills did not bite"
    for line in replayed:
        assert line["loss"] == losses[line["step"]], f"step {line['step']} diverged"
    assert len(events(resumed, "resume")) == len(PLAN) + 1 - sum(
        1 for line in events(resumed, "start"))
