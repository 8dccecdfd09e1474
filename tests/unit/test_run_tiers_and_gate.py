"""Run with a data gate, a mirror tier, and the launcher's TRAINGUARD_RUN_DIR."""

from __future__ import annotations

import json

import pytest
import torch

from trainguard import CheckpointManager
from trainguard.data_manifest import DataGate
from trainguard.errors import DataGateFailed
from trainguard.run import Run


def _train(run, steps):
    model = torch.nn.Linear(3, 3)
    run.track(model=model)
    for _ in run.steps(steps):
        run.log(loss=1.0)
    return model


def test_failing_data_gate_stops_before_any_step(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.json").write_text(json.dumps([0, 0]))
    gate = DataGate(str(cache), stats=lambda p: {"positive": sum(json.loads(p.read_text()))},
                    require=["positive > 0"])
    with pytest.raises(DataGateFailed, match=r"positive > 0 \(it is 0\)"):
        with Run(tmp_path / "run", save_every_steps=1, data_gate=gate) as run:
            _train(run, 3)
    assert not (tmp_path / "run" / "checkpoints").exists()  # not one step, not one save


def test_run_mirrors_to_a_bucket_and_a_fresh_machine_resumes_from_it(tmp_path, s3_env):
    url = f"s3://{s3_env}/runs/x"
    with Run(tmp_path / "a", save_every_steps=2, mirror=url) as run:
        _train(run, 4)
    assert CheckpointManager(url).latest_valid().step == 4  # close() waited for the upload
    with Run(tmp_path / "fresh", save_every_steps=2, mirror=url) as run:
        model = torch.nn.Linear(3, 3)
        assert run.track(model=model) == 4


def test_run_defaults_to_the_launchers_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINGUARD_RUN_DIR", str(tmp_path / "from-env"))
    with Run(save_every_steps=1) as run:
        _train(run, 2)
    assert CheckpointManager(tmp_path / "from-env").latest_valid().step == 2
    monkeypatch.delenv("TRAINGUARD_RUN_DIR")
    with pytest.raises(ValueError, match="needs a run directory"):
        Run(save_every_steps=1)


def test_an_error_inside_a_step_is_kept_but_not_resumed_from(tmp_path):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with Run(tmp_path, save_every_steps=3) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(10):
                model(torch.ones(2, 3)).sum().backward()
                opt.step()  # step 5's update is applied...
                if step == 5:
                    raise RuntimeError("boom")  # ...then the body fails
    infos = CheckpointManager(tmp_path).list()
    assert [(c.step, c.reason) for c in infos][-2:] == [(3, "periodic"), (4, "error")]
    assert infos[-1].manifest.tags["resumable"] == "false"
    with Run(tmp_path, save_every_steps=3) as run:
        assert run.track(model=torch.nn.Linear(3, 3)) == 3  # the consistent commit
