"""RunConfig validation and the preemption handler's pieces."""

from __future__ import annotations

import logging
import signal

import pytest

from trainguard.run import EXIT_RESUME, Preempted, Run, RunConfig, expect_any
from trainguard.run.signals import PreemptionHandler


def test_defaults_are_valid_and_commit_on_a_cadence():
    config = RunConfig()
    assert config.save_every_seconds == 600 and config.preempt_deadline == 25
    assert config.preempt_signals == (signal.SIGTERM, signal.SIGINT)
    assert EXIT_RESUME == 75


@pytest.mark.parametrize("options, message", [
    ({"save_every_steps": 0}, "save_every_steps must be an int >= 1"),
    ({"save_every_steps": 2.5}, "save_every_steps"),
    ({"save_every_seconds": -1}, "save_every_seconds must be a finite number"),
    ({"save_every_steps": None, "save_every_seconds": None}, "commits only at the end"),
    ({"log_every_steps": 0}, "log_every_steps"),
    ({"heartbeat_seconds": 0}, "heartbeat_seconds"),
    ({"preempt_deadline": float("inf")}, "preempt_deadline"),
    ({"max_rollbacks": -1}, "max_rollbacks"),
    ({"preempt_signals": ["SIGNOPE"]}, "not a signal"),
    ({"preempt_signals": [signal.SIGKILL]}, "cannot be caught"),
    ({"nonfinite_metric": ""}, "nonfinite_metric"),
])
def test_bad_values_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**options)


@pytest.mark.parametrize("options, message", [
    ({"keep": 3}, "retention policy"),
    ({"data_checks": [lambda batch: True]}, "expect_any"),
    ({"resume": "yes"}, "resume must be True or False"),
    ({"tensorboard": "auto"}, "tensorboard"),
    ({"wandb": "project"}, "wandb"),
])
def test_wrong_types_are_refused(options, message):
    with pytest.raises(TypeError, match=message):
        RunConfig(**options)


def test_unknown_run_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(TypeError, match=r"save_every_step\b.*valid options: .*save_every_steps"):
        Run(tmp_path, save_every_step=10)


def test_signals_by_name_and_checks_are_normalized():
    config = RunConfig(preempt_signals="SIGUSR1", data_checks=[expect_any(bool)])
    assert config.preempt_signals == (signal.SIGUSR1,)
    assert isinstance(config.data_checks, tuple)


def test_preempted_is_a_system_exit_with_the_resume_code():
    exc = Preempted(120, "SIGTERM")
    assert isinstance(exc, SystemExit) and not isinstance(exc, Exception)
    assert exc.code == EXIT_RESUME
    assert "step 120 is committed" in str(exc) and "EXIT_RESUME" in str(exc)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_deadline_watch_reports_a_late_commit_and_stands_down_after_one(caplog):
    clock = Clock()
    handler = PreemptionHandler((signal.SIGUSR2,), 25.0, describe=lambda: "phase save",
                                clock=clock)
    assert not handler.received and handler.remaining() == float("inf")
    handler.trigger(signal.SIGTERM)
    try:
        assert handler.received and handler.signal_name == "SIGTERM"
        clock.now = 10.0
        assert handler.remaining() == 15.0 and handler.elapsed() == 10.0
        with caplog.at_level(logging.ERROR, logger="trainguard"):
            handler._deadline_passed()
        assert "deadline passed" in caplog.text and "phase save" in caplog.text
        caplog.clear()
        handler.committed()
        with caplog.at_level(logging.ERROR, logger="trainguard"):
            handler._deadline_passed()
        assert caplog.text == ""
    finally:
        handler.uninstall()


def test_handlers_are_installed_and_restored():
    before = signal.getsignal(signal.SIGUSR2)
    handler = PreemptionHandler((signal.SIGUSR2,), 25.0)
    assert handler.install()
    assert signal.getsignal(signal.SIGUSR2) == handler._handle
    handler.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before
