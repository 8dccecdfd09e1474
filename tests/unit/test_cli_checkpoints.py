"""``trainguard ls | verify | gc`` through click's CliRunner (the real process is
exercised in tests/integration/test_cli_process.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from trainguard import CheckpointManager
from trainguard.cli import cli
from trainguard.errors import CheckpointNotFound, LockHeld, RunDirError


@pytest.fixture
def run_dir(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    for step in (100, 200, 300):
        mgr.save(step, {"w": torch.full((16,), float(step))},
                 metrics={"val_loss": {100: 0.3, 200: 0.1, 300: 0.2}[step]})
    mgr.close()
    return tmp_path / "run"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_ls_table_and_json(run_dir):
    result = invoke("ls", run_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["STEP", "CREATED", "SIZE"]
    assert [line.split()[0] for line in lines[1:]] == ["100", "200", "300"]
    assert all("valid" in line for line in lines[1:]) and "val_loss=0.1" in lines[2]
    rows = json.loads(invoke("ls", run_dir, "--json").output)
    assert [r["step"] for r in rows] == [100, 200, 300]
    assert rows[1]["metrics"] == {"val_loss": 0.1} and rows[0]["status"] == "valid"
    assert rows[0]["bytes"] > 64


def test_verify_ok_then_names_the_corrupt_file(run_dir):
    ok = invoke("verify", run_dir)
    assert ok.exit_code == 0 and ok.output.count(": ok") == 3
    shard, = (run_dir / "checkpoints" / "step-000000200").glob("tensors-00000.*safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = invoke("verify", run_dir)
    assert bad.exit_code == 1
    assert "step 200: CORRUPT" in bad.output and shard.name in bad.output
    assert invoke("verify", run_dir, "--step", 300).exit_code == 0
    assert invoke("verify", run_dir, "--step", 200).exit_code == 1


def test_gc_keeps_last_and_best(run_dir):
    dry = invoke("gc", run_dir, "--keep-last", 1, "--dry-run")
    assert dry.exit_code == 0 and "would delete 2" in dry.output
    assert len(list((run_dir / "checkpoints").iterdir())) == 3
    done = invoke("gc", run_dir, "--keep-last", 1, "--keep-best", 1, "--metric", "val_loss")
    assert done.exit_code == 0 and "deleted 1" in done.output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000000200", "step-000000300"]


def test_gc_refuses_while_a_writer_holds_the_run(run_dir):
    writer = CheckpointManager(run_dir)
    writer.save(400, {"w": torch.zeros(1)})
    result = invoke("gc", run_dir, "--keep-last", 1)
    writer.close()
    assert result.exit_code == LockHeld.exit_code and "locked by another writer" in result.output
    assert len(list((run_dir / "checkpoints").iterdir())) == 4


@pytest.mark.parametrize("args, message", [
    (["gc", "{run}"], "say what to keep"),
    (["gc", "{run}", "--keep-best", "1"], "--keep-best needs --metric"),
    (["gc", "{run}", "--keep-last", "0"], "0 is not in the range"),
    (["verify", "{run}", "--step", "-3"], "-3 is not in the range"),
])
def test_bad_options_are_usage_errors(run_dir, args, message):
    result = invoke(*[a.format(run=run_dir) for a in args])
    assert result.exit_code == 2 and message in result.output


def test_verify_missing_step(run_dir):
    result = invoke("verify", run_dir, "--step", 5)
    assert result.exit_code == CheckpointNotFound.exit_code
    assert "no checkpoint at step 5" in result.output


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_unusable_run_dirs_get_one_line_errors(tmp_path, command):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for target, message in [(tmp_path / "missing", "does not exist"),
                            (tmp_path / "empty", "holds no checkpoints"),
                            (tmp_path / "file", "is a file, not a run directory")]:
        result = invoke(command, target)
        assert result.exit_code == RunDirError.exit_code, result.output
        assert result.output.startswith("trainguard: error:") and message in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert result.exception is None or isinstance(result.exception, SystemExit)
