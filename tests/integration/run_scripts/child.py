"""Helpers for the parent side of the Run integration tests: start ``train_tiny`` in a
real (forked) subprocess, follow its stdout, and read what it committed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import safetensors.torch

from tests.integration.run_scripts.attempts import Attempt, shared_server
from trainguard import CheckpointManager

ROOT = Path(__file__).resolve().parents[3]
MODULE = "tests.integration.run_scripts.train_tiny"


def start(run_dir: Path, *args: str, stderr_path: Path | None = None) -> Attempt:
    """Start train_tiny on ``run_dir``, a fork of the shared fork server (torch imported
    once, see forkserver.py), with ``subprocess.Popen``'s interface; its stderr goes to
    ``stderr_path`` (or is dropped)."""
    return shared_server().start([MODULE, str(run_dir), *args], module=MODULE,
                                 stderr=stderr_path or Path(os.devnull))


def read_until(proc: Attempt, match: Callable[[str], bool]) -> str:
    """Read stdout lines until one matches; fails the test if the child exits first."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if match(line.strip()):
            return line.strip()
    proc.wait(timeout=30)
    raise AssertionError(f"child exited ({proc.returncode}) before the expected line")


def step_at_least(prefix: str, step: int) -> Callable[[str], bool]:
    """Matches ``"<prefix> N ..."`` with N >= step."""
    def match(line: str) -> bool:
        parts = line.split()
        return len(parts) >= 2 and parts[0] == prefix and int(parts[1]) >= step
    return match


def latest_step(run_dir: Path) -> int:
    """The newest valid checkpoint's step (0 when none)."""
    info = CheckpointManager(run_dir).latest_valid()
    return info.step if info else 0


def checkpoint_contents(run_dir: Path, step: int) -> tuple[dict, dict]:
    """(the state file as parsed JSON, every tensor of every shard) of one checkpoint,
    by the names its manifest gives them (each save names its files uniquely)."""
    directory = run_dir / "checkpoints" / f"step-{step:09d}"
    manifest = next(i for i in CheckpointManager(run_dir).list() if i.step == step).manifest
    tensors: dict = {}
    for name in sorted(manifest.files):
        if name.endswith(".safetensors"):
            tensors.update(safetensors.torch.load_file(directory / name))
    return json.loads((directory / manifest.state_file).read_text()), tensors


def metric_lines(run_dir: Path) -> list[dict]:
    """Every metrics line (not events) of metrics.jsonl, in file order."""
    lines = (json.loads(raw) for raw in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [line for line in lines if "event" not in line]


def events(run_dir: Path, kind: str) -> list[dict]:
    """The event lines of one kind in metrics.jsonl."""
    lines = (json.loads(raw) for raw in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [line for line in lines if line.get("event") == kind]
