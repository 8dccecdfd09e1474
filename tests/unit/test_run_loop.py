"""Run in-process: resume, cadence, saves at the end and on break, errors, preemption."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from torch import nn

from trainguard import CheckpointManager, LockHeld, keep_last
from trainguard.run import EXIT_RESUME, Preempted, ResumableLoader, Run, read_heartbeat
from trainguard.store import LocalStore

FAST = {"heartbeat_seconds": 3600.0, "tensorboard": False, "wandb": False}


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model, optimizer, step: int) -> torch.Tensor:
    x = torch.full((3, 4), float(step))
    loss = model(x).pow(2).mean() * 1e-3
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def saved(run_dir) -> list[tuple[int, str]]:
    return [(i.step, i.reason) for i in CheckpointManager(run_dir).list() if i.valid]


def events(run_dir, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("event") == kind]


def test_fresh_start_then_resume_continues_after_the_restored_step(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=4, **FAST) as run:
        assert run.track(model=model, optimizer=opt) == 0
        seen = []
        for step in run.steps(6):
            seen.append(step)
            run.log(loss=train(model, opt, step))
    assert seen == [1, 2, 3, 4, 5, 6]
    assert saved(tmp_path) == [(4, "periodic"), (6, "final")]

    other, other_opt = tiny(seed=1)  # different init: the resume must overwrite it
    with Run(tmp_path, save_every_steps=4, **FAST) as run:
        assert run.track(model=other, optimizer=other_opt) == 6
        assert torch.equal(other.weight, model.weight)
        assert list(run.steps(9)) == [7, 8, 9]
    assert saved(tmp_path)[-2:] == [(8, "periodic"), (9, "final")]
    assert [e["step"] for e in events(tmp_path, "resume")] == [6]


def test_cadence_by_seconds_uses_the_injected_clock(tmp_path):
    clock, model, opt = FakeClock(), *tiny()
    with Run(tmp_path, save_every_steps=None, save_every_seconds=10, clock=clock,
             **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(10):
            run.log(loss=train(model, opt, step))
            clock.now += 4  # each step "takes" 4 s: due after 3 steps (12 s)
    assert saved(tmp_path) == [(3, "periodic"), (6, "periodic"), (9, "periodic"),
                               (10, "final")]
    commits = events(tmp_path, "commit")
    assert [c["step"] for c in commits] == [3, 6, 9, 10]
    assert all(c["bytes"] > 0 and c["seconds"] >= 0 for c in commits)


def test_break_saves_the_step_whose_body_completed(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=100, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(50):
            run.log(loss=train(model, opt, step))
            if step == 6:
                break
    assert saved(tmp_path) == [(6, "exit")]
    again, again_opt = tiny(seed=3)
    with Run(tmp_path, save_every_steps=100, **FAST) as run:
        run.track(model=again, optimizer=again_opt)
        assert next(iter(run.steps(50))) == 7
        assert torch.equal(again.weight, model.weight)


def test_metrics_land_only_in_the_checkpoint_of_their_own_step(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=4, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(8):
            run.log(loss=train(model, opt, step))
            if step == 4:
                with run.phase("validate"):
                    pass
                run.log(val_loss=0.25)
    infos = {i.step: i for i in CheckpointManager(tmp_path).list()}
    assert infos[4].metrics["val_loss"] == 0.25
    assert "val_loss" not in infos[8].metrics and "loss" in infos[8].metrics


def test_request_save_commits_at_the_end_of_that_step(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=100, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(5):
            train(model, opt, step)
            if step == 2:
                run.request_save()
    assert saved(tmp_path) == [(2, "requested"), (5, "final")]


def test_resume_false_refuses_a_directory_with_checkpoints(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=2, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(2):
            train(model, opt, step)
    with Run(tmp_path, save_every_steps=2, resume=False, **FAST) as run:
        with pytest.raises(ValueError, match="resume=False.*newest: step 2"):
            run.track(model=model, optimizer=opt)


def test_a_second_writer_is_refused_on_enter(tmp_path):
    with Run(tmp_path, save_every_steps=2, **FAST):
        with pytest.raises(LockHeld):
            Run(tmp_path, save_every_steps=2, **FAST).__enter__()


def test_wrong_calls_name_the_fix(tmp_path):
    model, opt = tiny()
    with pytest.raises(RuntimeError, match="with Run"):
        Run(tmp_path, save_every_steps=2).track(model=model)
    with Run(tmp_path, save_every_steps=2, **FAST) as run:
        with pytest.raises(RuntimeError, match="track"):
            run.steps(3)
        with pytest.raises(TypeError, match=r"run.track\(epoch=...\).*int"):
            run.track(model=model, epoch=3)
        with pytest.raises(ValueError, match="Run's own"):
            run.track(model=model, trainguard={})
        loader = ResumableLoader(torch.arange(8.0), batch_size=2)
        run.track(model=model, optimizer=opt)
        with pytest.raises(RuntimeError, match="already"):
            run.track(model=model)
        with pytest.raises(ValueError, match="track it too"):
            run.steps(3, data=loader)
        with pytest.raises(ValueError, match="total"):
            run.steps(-1)
        with pytest.raises(ValueError, match="reserved|field of every"):
            run.log(step=3)
        with pytest.raises(TypeError, match="'loss' must be a number"):
            run.log(loss="low")


def test_exception_commits_an_error_checkpoint_and_reraises_the_same_exception(tmp_path):
    model, opt = tiny()
    boom = ValueError("boom")
    with pytest.raises(ValueError) as raised:
        with Run(tmp_path, save_every_steps=5, keep=keep_last(5), **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(20):
                run.log(loss=train(model, opt, step))
                if step == 7:
                    raise boom
    assert raised.value is boom
    assert raised.traceback[-1].name == "test_exception_commits_an_error_checkpoint_and_reraises_the_same_exception"  # noqa: E501
    info = CheckpointManager(tmp_path).latest_valid()
    # Steps 1-6 completed; the error checkpoint holds what step 7 left, labelled 6.
    assert (info.step, info.reason) == (6, "error")
    assert info.manifest.tags["error"] == "ValueError: boom"
    assert info.metrics == {}  # step 7's values do not describe it: never "best"
    assert read_heartbeat(tmp_path).status == "failed"
    assert events(tmp_path, "end")[-1]["status"] == "failed"


def test_no_error_checkpoint_without_progress_or_with_nan_weights(tmp_path):
    model, opt = tiny()
    with pytest.raises(KeyError):
        with Run(tmp_path, save_every_steps=2, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(20):
                train(model, opt, step)
                if step == 3:  # step 2 was just committed: nothing new to save
                    raise KeyError("x")
    assert saved(tmp_path) == [(2, "periodic")]
    with pytest.raises(KeyError):
        with Run(tmp_path, save_every_steps=5, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(20):
                train(model, opt, step)
                if step == 4:
                    with torch.no_grad():
                        model.weight.fill_(float("nan"))
                    raise KeyError("y")
    assert saved(tmp_path) == [(2, "periodic")]  # a NaN model is never committed


def test_sigterm_finishes_the_step_commits_and_exits_with_resume_code(tmp_path):
    model, opt = tiny()
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    with pytest.raises(SystemExit) as stopped:
        with Run(tmp_path, save_every_steps=100, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(20):
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step
                run.log(loss=train(model, opt, step))  # the step still completes
                seen.append(step)
    assert isinstance(stopped.value, Preempted)
    assert stopped.value.code == EXIT_RESUME == 75 and stopped.value.step == 3
    assert seen == [1, 2, 3]
    assert saved(tmp_path) == [(3, "preempted")]
    assert CheckpointManager(tmp_path).latest_valid().manifest.tags["signal"] == "SIGTERM"
    assert read_heartbeat(tmp_path).status == "preempted"
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_preemption_can_end_the_loop_without_exiting(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=100, exit_on_preempt=False,
             preempt_signals=["SIGUSR1"], **FAST) as run:
        run.track(model=model, optimizer=opt)
        seen = []
        for step in run.steps(20):
            seen.append(step)
            train(model, opt, step)
            if step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
        assert run.preempted and run.exit_code == EXIT_RESUME
    assert seen == [1, 2]
    assert saved(tmp_path) == [(2, "preempted")]


def test_a_second_signal_stops_at_once(tmp_path):
    model, opt = tiny()
    with pytest.raises(KeyboardInterrupt):
        with Run(tmp_path, save_every_steps=100, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(20):
                train(model, opt, step)
                if step == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)  # the user insists: Ctrl-C twice
    assert saved(tmp_path) == []


def test_signal_before_the_first_step_exits_without_a_save(tmp_path):
    model, opt = tiny()
    with pytest.raises(Preempted) as stopped:
        with Run(tmp_path, save_every_steps=100, **FAST) as run:
            run.track(model=model, optimizer=opt)
            os.kill(os.getpid(), signal.SIGTERM)
            for _step in run.steps(20):
                pytest.fail("no step may start after a preemption signal")
    assert stopped.value.step == 0 and saved(tmp_path) == []


def test_log_outside_the_loop_writes_a_line_at_once(tmp_path):
    model, opt = tiny()
    with Run(tmp_path, save_every_steps=100, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(3):
            train(model, opt, step)
        run.log(test_accuracy=0.9)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("test_accuracy") == 0.9 and line["step"] == 3 for line in lines)


class FailingStore(LocalStore):
    """Fails every write of one step's checkpoint (a full disk, a lost mount...)."""

    def __init__(self, root, bad_step: int) -> None:
        super().__init__(root)
        self.bad = f"checkpoints/step-{bad_step:09d}/"

    def write(self, key, data):
        if key.startswith(self.bad):
            raise OSError(28, "No space left on device")
        return super().write(key, data)


def test_a_failed_background_save_is_reported_and_the_next_one_retries(tmp_path, caplog):
    model, opt = tiny()
    with caplog.at_level(logging.ERROR, logger="trainguard"):
        with Run(FailingStore(tmp_path, bad_step=2), save_every_steps=2, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(6):
                train(model, opt, step)
            assert run.last_committed == 6
    assert "save of step 2 failed" in caplog.text and "training goes on" in caplog.text
    assert [e["step"] for e in events(tmp_path, "save_failed")] == [2]
    assert saved(tmp_path) == [(4, "periodic"), (6, "final")]


def test_a_configured_manager_can_be_passed_in(tmp_path):
    model, opt = tiny()
    manager = CheckpointManager(tmp_path, keep=keep_last(1))
    with Run(manager, save_every_steps=2, **FAST) as run:
        run.track(model=model, optimizer=opt)
        assert run.manager is manager
        for step in run.steps(4):
            train(model, opt, step)
    assert saved(tmp_path) == [(4, "final")]
    with pytest.raises(ValueError, match="give the retention policy to the CheckpointManager"):
        Run(CheckpointManager(tmp_path), keep=keep_last(1), **FAST).__enter__()


def test_snapshot_memory_is_reserved_after_step_one_for_the_whole_state(tmp_path):
    """A fresh AdamW holds no moments until its first step: reserving at track() would
    size the buffer for a third of the state and the first save would allocate anew."""
    model, opt = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Run(tmp_path, save_every_steps=3, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(3):
            run.log(loss=train(model, opt, step))
            if step == 2:  # reserved after step 1, with the moments
                arena = run.manager.writer.arena
                arena._adopt_reserved()
                reserved = arena._buffer.data_ptr()
                assert arena.capacity >= 3 * sum(p.nbytes for p in model.parameters())
        run.manager.wait()
        assert arena._buffer.data_ptr() == reserved  # the first save (step 3) used it
