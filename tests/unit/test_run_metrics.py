"""Metrics lines: means, speed, ETA, JSONL, stderr, TensorBoard and W&B sinks."""

from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import pytest
import torch

from trainguard.run import METRICS_FILE, Run
from trainguard.run.metrics import MetricsLogger, open_sinks, show_logs, to_number

FAST = {"heartbeat_seconds": 3600.0, "save_every_steps": 100}


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_a_line_carries_means_speed_and_eta(tmp_path, caplog):
    clock = Clock()
    metrics = MetricsLogger(tmp_path, clock=clock, wall_clock=lambda: 1234.5)
    metrics.begin(step=100, total=1100, samples=6400)
    metrics.add({"loss": 1.0, "lr": 0.001})
    metrics.add({"loss": 3.0, "lr": 0.001})
    clock.now += 4.0  # 20 steps and 1280 samples in 4 s
    with caplog.at_level(logging.INFO, logger="trainguard"):
        record = metrics.line(step=120, samples=7680)
    gpu = {k for k in record if k.startswith("gpu_")}  # present only with CUDA in use
    assert {k: v for k, v in record.items() if k not in gpu} == {
        "time": 1234.5, "step": 120, "total": 1100, "loss": 2.0, "lr": 0.001,
        "steps_per_s": 5.0, "samples_per_s": 320.0, "eta_s": 196.0}
    assert records(tmp_path) == [record]  # already on disk: flushed per line
    assert ("step 120/1100  loss 2  lr 0.001  5.00 steps/s  320 samples/s  eta 3m16s"
            in caplog.text)
    clock.now += 1.0
    nxt = metrics.line(step=121, samples=7744)
    assert "loss" not in nxt and nxt["steps_per_s"] == 1.0  # a new window


def test_events_and_non_finite_values_are_valid_json(tmp_path):
    metrics = MetricsLogger(tmp_path)
    metrics.add({"loss": float("nan")})
    metrics.line(step=1)
    metrics.event("commit", 1, reason="periodic", bytes=10)
    metrics.close()
    lines = records(tmp_path)
    assert lines[0]["loss"] == "nan"
    assert lines[1]["event"] == "commit" and lines[1]["bytes"] == 10
    assert "NaN" not in (tmp_path / METRICS_FILE).read_text()


def test_logged_values_are_converted_or_refused():
    assert to_number("loss", torch.tensor(2.5)) == 2.5
    assert to_number("acc", np.float32(0.5)) == 0.5
    with pytest.raises(TypeError, match="shape"):
        to_number("loss", torch.ones(3))
    with pytest.raises(TypeError, match="'flag' must be a number"):
        to_number("flag", True)


def test_show_logs_adds_a_stderr_handler_only_when_nothing_is_configured(monkeypatch):
    logger = logging.getLogger("trainguard")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    undo = show_logs()
    assert len(logger.handlers) == 1 and logger.level == logging.INFO
    assert logger.handlers[0].stream is sys.stderr
    undo()
    assert logger.handlers == [] and logger.level == logging.NOTSET
    configured = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger(), "handlers", [configured])
    show_logs()()
    assert logger.handlers == []  # the application's logging config rules


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Linear(2, 1)
    with Run(tmp_path, log_every_steps=2, tensorboard=True, **FAST) as run:
        run.track(model=model)
        for step in run.steps(6):
            run.log(loss=float(step))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 1.5), (4, 3.5), (6, 5.5)]
    assert "steps_per_s" in events.Tags()["scalars"]


def test_tensorboard_asked_for_but_missing_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ImportError, match=r"trainguard\[tensorboard\]"):
        open_sinks(tmp_path, tensorboard=True, wandb=False, purge_step=1)
    assert open_sinks(tmp_path, tensorboard=None, wandb=False, purge_step=1) == []


def fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or types.SimpleNamespace(
        finish=lambda: calls.append(("finish",)))
    module.log = lambda values, step: calls.append(("log", step, dict(values)))
    module.finish = lambda: calls.append(("module.finish",))
    return module


def test_wandb_logs_each_line_and_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    model = torch.nn.Linear(2, 1)
    for total in (2, 4):
        with Run(tmp_path, log_every_steps=2, tensorboard=False, wandb={"project": "p"},
                 **FAST) as run:
            run.track(model=model)
            for _step in run.steps(total):
                run.log(loss=0.5)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"]  # one W&B run, resumed
    assert inits[0]["resume"] == "allow" and inits[0]["project"] == "p"
    assert [(c[1], c[2]["loss"]) for c in calls if c[0] == "log"] == [(2, 0.5), (4, 0.5)]
    assert calls.count(("finish",)) == 2


def test_wandb_is_used_only_when_configured(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert open_sinks(tmp_path, tensorboard=False, wandb=None, purge_step=1) == []
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    sinks = open_sinks(tmp_path, tensorboard=False, wandb=None, purge_step=1)
    assert len(sinks) == 1 and calls[0][0] == "init"


def test_a_failing_sink_is_dropped_and_training_goes_on(tmp_path, caplog):
    class Broken:
        closed = False

        def write(self, step, scalars):
            raise OSError("disk full")

        def close(self):
            self.closed = True

    metrics = MetricsLogger(tmp_path, [Broken()])
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        metrics.line(step=1)
        metrics.line(step=2)
    assert caplog.text.count("disk full") == 1 and metrics.sinks == []
    assert [r["step"] for r in records(tmp_path)] == [1, 2]
