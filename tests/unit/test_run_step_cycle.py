"""The Run's step cycle: its transitions, and the ones it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainguard import CheckpointManager
from trainguard.run import Run
from trainguard.run.step_cycle import Stage, StepCycle

FAST = {"heartbeat_seconds": 3600.0, "tensorboard": False, "wandb": False}


def test_a_step_begins_after_the_done_one_and_completes():
    cycle = StepCycle()
    cycle.start_at(4)
    cycle.begin(5)
    assert (cycle.stage, cycle.step, cycle.done) == (Stage.IN_STEP, 5, 4)
    cycle.count_samples(32)
    assert cycle.complete() == 5
    assert (cycle.stage, cycle.step, cycle.done, cycle.samples) == (Stage.BETWEEN, 5, 5, 32)


def test_what_a_step_recorded_is_cleared_when_the_next_begins():
    cycle = StepCycle()
    cycle.begin(1)
    cycle.record({"loss": 1.0})
    cycle.mark_nonfinite(float("nan"))
    cycle.note_phase()
    cycle.count_samples(8)
    cycle.abandon()
    cycle.begin(1)
    assert (cycle.values_for(1), cycle.nonfinite, cycle.phase_ran, cycle.samples) == \
        ({}, None, False, 0)


def test_between_steps_nothing_is_marked_nonfinite_and_no_phase_is_noted():
    cycle = StepCycle()
    cycle.mark_nonfinite(float("inf"))  # epoch-end work: there is no step to roll back
    cycle.note_phase()
    assert (cycle.nonfinite, cycle.phase_ran) == (None, False)


def test_values_describe_only_their_own_step():
    cycle = StepCycle()
    cycle.begin(1)
    cycle.record({"val_loss": 0.5})
    cycle.complete()
    cycle.record({"acc": 0.9})  # epoch-end values join the step just ended
    assert cycle.values_for(1) == {"val_loss": 0.5, "acc": 0.9}
    assert cycle.values_for(2) == {}
    cycle.begin(2)
    cycle.record({"loss": float("nan")})
    cycle.abandon()  # an abandoned step's values describe no checkpoint of step 1
    assert cycle.values_for(1) == {}


def test_a_rollback_places_the_cycle_at_the_restored_step():
    cycle = StepCycle()
    cycle.start_at(10)
    cycle.begin(11)
    cycle.roll_back(8)
    assert (cycle.stage, cycle.step, cycle.done) == (Stage.BETWEEN, 8, 8)
    cycle.begin(9)


@pytest.mark.parametrize("illegal, match", [
    (lambda c: c.begin(3), "next step after step 0 is 1"),
    (lambda c: c.complete(), "cannot complete a step: the run is between steps"),
    (lambda c: c.abandon(), "between steps"),
    (lambda c: c.roll_back(0), "between steps"),
    (lambda c: c.count_samples(1), "between steps"),
])
def test_illegal_transitions_between_steps_raise(illegal, match):
    with pytest.raises(RuntimeError, match=match):
        illegal(StepCycle())


def test_illegal_transitions_inside_a_step_raise():
    cycle = StepCycle()
    cycle.begin(1)
    with pytest.raises(RuntimeError, match="cannot begin step 2: the run is inside a step"):
        cycle.begin(2)
    with pytest.raises(RuntimeError, match="inside a step"):
        cycle.start_at(5)


def test_no_step_begins_once_closed():
    cycle = StepCycle()
    cycle.close()
    with pytest.raises(RuntimeError, match="the run is closed"):
        cycle.begin(1)


def test_the_first_end_is_claimed_once():
    cycle = StepCycle()
    assert [cycle.claim_first_end() for _ in range(3)] == [True, False, False]


def test_a_steps_loop_left_with_break_counts_before_an_epoch_loop(tmp_path):
    model = nn.Linear(2, 1)
    with Run(tmp_path, save_every_steps=100, **FAST) as run:
        run.track(model=model)
        for step in run.steps(10):
            if step == 3:
                break
        for _ in run.epochs(1):
            assert [run.step for _ in run.batches(range(2))] == [4, 5]
    assert [i.step for i in CheckpointManager(tmp_path).list()] == [5]
    assert repr(run).endswith("step=5, total=None)")


def test_a_generator_used_after_the_run_exited_refuses_to_step(tmp_path):
    with Run(tmp_path, **FAST) as run:
        run.track(x=torch.zeros(1))
        steps = iter(run.steps(5))
        next(steps)
    with pytest.raises(RuntimeError, match="the run is closed"):
        next(steps)
