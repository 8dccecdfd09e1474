"""The examples run for real (shortened): preempted by a real SIGTERM, then resumed."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.run_scripts.attempts import shared_server
from trainguard import CheckpointManager
from trainguard.run import EXIT_RESUME

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run an example as ``python examples/NAME ARGS`` would, in a fork of the shared fork
    server (torch imported once); its stderr is collected from a file."""
    script = str(ROOT / "examples" / name)
    with tempfile.NamedTemporaryFile(suffix=".stderr") as err:
        attempt = shared_server().start([script, *args], script=script, stderr=Path(err.name))
        out, _ = attempt.communicate(timeout=300)
        return subprocess.CompletedProcess([script, *args], attempt.returncode, out,
                                           Path(err.name).read_text())


def test_digits_example_preempts_then_resumes(tmp_path):
    pytest.importorskip("sklearn")  # the examples extra
    run_dir = str(tmp_path / "digits")
    first = _example("train_digits.py", "--run-dir", run_dir, "--steps", "60",
                     "--save-every", "20", "--preempt-at", "30")
    assert first.returncode == EXIT_RESUME, first.stderr[-3000:]
    assert "received SIGTERM" in first.stderr
    assert CheckpointManager(run_dir).latest_valid().step == 30
    second = _example("train_digits.py", "--run-dir", run_dir, "--steps", "60",
                      "--save-every", "20")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 30" in second.stderr
    latest = CheckpointManager(run_dir).latest_valid()
    assert latest.step == 60 and latest.reason == "final"
    assert "val_loss" in latest.metrics


def test_lm_example_trains_and_samples(tmp_path):
    run_dir = str(tmp_path / "lm")
    done = _example("train_lm.py", "--run-dir", run_dir, "--steps", "6", "--eval-every", "3",
                    "--batch", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("We hold ")
    infos = [i for i in CheckpointManager(run_dir).list() if i.valid]
    assert [i.step for i in infos] == [3, 6] and "val_loss" in infos[-1].metrics
