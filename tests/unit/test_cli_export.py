"""``CheckpointManager.best``, ``CheckpointInfo`` as documented, and ``trainguard export``
(through click's CliRunner)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from torch import nn

from trainguard import CheckpointManager, RNGState
from trainguard.cli import cli

LOSSES = {100: 0.3, 200: 0.1, 300: 0.2, 400: float("nan")}


@pytest.fixture
def run_dir(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    for step, loss in LOSSES.items():
        model = nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(step)
        mgr.save(step, {"model": model, "optimizer": {"lr": 0.1}, "rng": RNGState()},
                 metrics={"val_loss": loss, "acc": step / 1000}, tags={"by": "test"})
    error_model = nn.Linear(3, 2)
    with torch.no_grad():
        error_model.weight.fill_(500)
    mgr.save(500, {"model": error_model}, metrics={"val_loss": 0.01}, reason="error")
    mgr.close()
    return tmp_path / "run"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_best_picks_like_keep_best_and_info_reads_as_documented(run_dir):
    mgr = CheckpointManager(run_dir)
    best = mgr.best("val_loss", "min")  # not the NaN, not the error checkpoint
    assert best.step == 200 and best.metrics["val_loss"] == 0.1
    assert mgr.best("acc", "max").step == 400
    assert mgr.best("missing") is None
    with pytest.raises(ValueError, match="mode"):
        mgr.best("val_loss", "lowest")
    # The documented fields of the parsed manifest, and their shortcuts on the info.
    assert best.manifest.metrics == best.metrics and best.manifest.reason == best.reason
    assert best.manifest.tags == best.tags == {"by": "test"}
    assert best.manifest.state_file in best.manifest.files and best.manifest.created_at > 0


def test_export_best_writes_a_plain_state_dict(run_dir, tmp_path):
    out = tmp_path / "out" / "best.safetensors"
    result = invoke("export", run_dir, "--best", "val_loss", "--mode", "min", out)
    assert result.exit_code == 0, result.output
    assert "step 200" in result.output and "val_loss=0.1" in result.output
    tensors = safetensors.torch.load_file(out)
    assert sorted(tensors) == ["bias", "weight"]  # the module's state_dict, nothing else
    assert torch.equal(tensors["weight"], torch.full((2, 3), 200.0))
    model = nn.Linear(3, 2)
    model.load_state_dict(tensors)  # any tool opens it


def test_export_pt_only_when_asked_and_by_step(run_dir, tmp_path):
    out = tmp_path / "model.pt"
    assert invoke("export", run_dir, "--step", 100, out).exit_code == 0
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["weight"], torch.full((2, 3), 100.0))
    plain = tmp_path / "newest.bin"
    assert invoke("export", run_dir, plain).exit_code == 0  # the newest valid one
    assert torch.equal(safetensors.torch.load_file(plain)["weight"],
                       torch.full((2, 3), 500.0))


def test_export_mistakes_end_in_one_line_naming_the_fix(run_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    result = invoke("export", run_dir, "--best", "bleu", out)
    assert result.exit_code != 0 and "recorded 'bleu'" in result.output
    assert "acc" in result.output and "Traceback" not in result.output
    result = invoke("export", run_dir, "--key", "optimizer", out)
    assert result.exit_code != 0 and "--key NAME" in result.output
    result = invoke("export", run_dir, "--step", 7, out)
    assert result.exit_code != 0 and "no valid checkpoint at step 7" in result.output
    result = invoke("export", tmp_path / "nowhere", out)
    assert result.exit_code != 0 and "does not exist" in result.output
    assert not out.exists()
