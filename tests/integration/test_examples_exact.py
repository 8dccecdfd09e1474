"""The two example ports (examples/word_language_model.py, examples/image_classification.py)
killed with SIGKILL at random moments after commits, then rerun with the same command,
end with the final checkpoint of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.run_scripts.attempts import killed_and_resumed
from tests.integration.test_run_loops_exact import assert_identical

ROOT = Path(__file__).resolve().parents[2]
SEED = os.environ.get("TRAINGUARD_KILL_SEED", "20240613")


def run_example(server, tmp_path, name: str, *options: str):
    script = str(ROOT / "examples" / name)
    return killed_and_resumed(
        server, tmp_path, lambda run_dir: [script, "--save-dir", str(run_dir), *options],
        {"script": script}, seed=f"{SEED}-{name}")


def test_word_language_model_resumes_bit_exact(fork_server, tmp_path):
    reference, resumed = run_example(fork_server, tmp_path, "word_language_model.py",
                                     "--epochs", "3", "--log-interval", "1")
    assert_identical(reference, resumed, python_seeded=False)
    assert (resumed / "best.pt").exists()


def test_image_classification_resumes_bit_exact(fork_server, tmp_path):
    pytest.importorskip("sklearn")  # the examples extra
    reference, resumed = run_example(fork_server, tmp_path, "image_classification.py",
                                     "--epochs", "3", "--batch-size", "100",
                                     "--log-interval", "1", "--workers", "2")
    assert_identical(reference, resumed, python_seeded=False)
