"""The installed ``trainguard`` command as a real process: user mistakes give one line on
stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import torch

from trainguard import CheckpointManager
from trainguard.errors import RunDirError


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainguard", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_bad_run_dirs_exit_nonzero_without_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for target in ["missing", "file", "empty"]:
        for command in (["ls"], ["verify"], ["gc", "--keep-last", "1"]):
            result = run_cli(command[0], tmp_path / target, *command[1:])
            assert result.returncode == RunDirError.exit_code, (target, command, result.stderr)
            assert "Traceback" not in result.stderr + result.stdout
            assert result.stderr.startswith("trainguard: error:")


def test_ls_verify_on_a_real_run(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, {"w": torch.ones(3)}, metrics={"loss": 0.5})
    mgr.close()
    listed = run_cli("ls", tmp_path)
    assert listed.returncode == 0 and "loss=0.5" in listed.stdout
    verified = run_cli("verify", tmp_path)
    assert verified.returncode == 0 and "step 3: ok" in verified.stdout
    assert run_cli("--version").stdout.strip().endswith("0.1.0")
