"""Guards: non-finite rollback, data checks on the first batches, OOM micro-batching."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trainguard import CheckpointManager
from trainguard.run import (
    DataCheckFailed,
    MicroBatcher,
    NonFiniteLoss,
    ResumableLoader,
    Run,
    expect_all,
    expect_any,
    expect_mean,
)
from trainguard.run.guards import batch_length, slice_batch

FAST = {"heartbeat_seconds": 3600.0, "tensorboard": False, "wandb": False}


def events(run_dir, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("event") == kind]


def regression(poison: int | None = None):
    """40 samples, batch 4 (10 batches, no reshuffle inside the 8 steps used), an optional
    sample whose features are NaN."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    if poison is not None:
        x[poison] = float("nan")
    loader = ResumableLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, seed=1)
    model = nn.Linear(3, 1)
    return loader, model, torch.optim.SGD(model.parameters(), lr=0.05)


def step_on(model, optimizer, batch) -> torch.Tensor:
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


# -- non-finite loss ---------------------------------------------------------------------


def test_nan_injected_at_step_k_rolls_back_and_the_run_completes(tmp_path):
    loader, model, opt = regression()
    injected = []
    with Run(tmp_path, save_every_steps=2, **FAST) as run:
        run.track(model=model, optimizer=opt, data=loader)
        ran = []
        for step, batch in run.steps(8, data=loader):
            if step == 5 and not injected:
                injected.append(step)
                with torch.no_grad():
                    model.weight.fill_(float("inf"))  # blows up this step's loss
            ran.append(step)
            run.log(loss=step_on(model, opt, batch))
        assert run.rollbacks == 1
    assert ran == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran again after the rollback to 4
    assert torch.isfinite(model.weight).all()
    assert [(e["step"], e["to_step"]) for e in events(tmp_path, "rollback")] == [(5, 4)]
    assert [e["step"] for e in events(tmp_path, "skip")] == [5]
    assert CheckpointManager(tmp_path).latest_valid().step == 8


def test_a_bad_batch_is_skipped_after_the_rollback(tmp_path):
    loader, model, opt = regression(poison=0)
    order = loader.sampler.order(0).tolist()
    bad_step = order.index(0) // 4 + 1  # the step whose batch holds the NaN sample
    assert 2 < bad_step <= 8, "pick another seed: the poisoned batch must come mid-run"
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(model=model, optimizer=opt, data=loader)
        for _step, batch in run.steps(8, data=loader):
            run.log(loss=step_on(model, opt, batch))
        assert run.rollbacks == 1  # one rollback suffices: the replay skips the batch
    assert torch.isfinite(model.weight).all()
    assert [e["step"] for e in events(tmp_path, "skip")] == [bad_step]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["loss"] != "nan" for line in lines if "loss" in line)  # window reset
    again = regression(poison=0)
    with Run(tmp_path, save_every_steps=1, **FAST) as run:  # the skip list is checkpointed
        run.track(model=again[1], optimizer=again[2], data=again[0])
        assert run.state["trainguard"]["run"].skip_steps == [bad_step]
        assert run.rollbacks == 1


def test_nan_weights_behind_a_finite_loss_are_never_committed(tmp_path):
    loader, model, opt = regression()
    poisoned = []
    with Run(tmp_path, save_every_steps=2, **FAST) as run:
        run.track(model=model, optimizer=opt, data=loader)
        for step, batch in run.steps(6, data=loader):
            run.log(loss=step_on(model, opt, batch))  # finite: computed before the update
            if step == 4 and not poisoned:
                poisoned.append(step)
                with torch.no_grad():
                    model.bias.fill_(float("nan"))  # as a huge gradient step would leave it
    rollback = events(tmp_path, "rollback")
    assert [(e["step"], e["to_step"]) for e in rollback] == [(4, 2)]
    assert "parameters hold NaN/inf" in rollback[0]["why"]
    for info in CheckpointManager(tmp_path).list():
        state = {"model": nn.Linear(3, 1)}
        CheckpointManager(tmp_path).restore(state, step=info.step)
        assert torch.isfinite(state["model"].bias).all(), info.step


def test_rollbacks_are_bounded_then_fail_clearly_without_saving_nan(tmp_path):
    loader, model, opt = regression()
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 3 after 2 rollback"):
        with Run(tmp_path, save_every_steps=2, max_rollbacks=2, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for step in run.steps(8):
                run.log(loss=float("nan") if step == 3 else 1.0)  # same NaN every replay
    assert [i.step for i in CheckpointManager(tmp_path).list()] == [2]
    assert len(events(tmp_path, "rollback")) == 2


def test_nan_before_the_first_checkpoint_fails_clearly(tmp_path):
    loader, model, opt = regression()
    with pytest.raises(NonFiniteLoss, match="no checkpoint to roll back to"):
        with Run(tmp_path, save_every_steps=10, **FAST) as run:
            run.track(model=model, optimizer=opt)
            for _step in run.steps(8):
                run.log(loss=float("inf"))
    assert CheckpointManager(tmp_path).list() == []


def test_the_guard_can_be_turned_off(tmp_path):
    loader, model, opt = regression()
    with Run(tmp_path, save_every_steps=2, nonfinite_metric=None, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for _step in run.steps(3):
            run.log(loss=float("nan"))
        assert run.rollbacks == 0


# -- data checks -------------------------------------------------------------------------


def test_data_check_stops_the_run_early_with_a_clear_message(tmp_path):
    loader, model, opt = regression()
    positives = expect_mean(lambda b: (b[1] > 10).float().mean(), above=0.0, within=5,
                            name="positive fraction")
    trained = []
    with pytest.raises(DataCheckFailed, match=r"'positive fraction' failed: mean 0, "
                                              r"expected > 0.0 .*first 5 batch"):
        with Run(tmp_path, save_every_steps=2, data_checks=[positives], **FAST) as run:
            run.track(model=model, optimizer=opt, data=loader)
            for step, batch in run.steps(100, data=loader):
                trained.append(step)
                step_on(model, opt, batch)
    assert trained == [1, 2, 3, 4]  # stopped before training on the 5th batch
    assert [i.step for i in CheckpointManager(tmp_path).list()] == [2, 4]  # no error save


def test_data_checks_that_hold_let_the_run_finish(tmp_path):
    loader, model, opt = regression()
    checks = [expect_any(lambda b: (b[1] > 0).any(), within=3),
              expect_all(lambda b: torch.isfinite(b[0]).all(), within=10),
              expect_mean(lambda b: len(b[0]), above=3, below=5, within=4)]
    with Run(tmp_path, save_every_steps=2, data_checks=checks, **FAST) as run:
        run.track(model=model, optimizer=opt, data=loader)
        for _step, batch in run.steps(6, data=loader):
            step_on(model, opt, batch)
    assert all(not c.seen for c in checks)  # the Run checked fresh copies


def test_expect_any_and_expect_all_fail_where_they_should():
    never = expect_any(lambda b: False, within=3, name="labels present")
    never.update(1)
    never.update(2)
    with pytest.raises(DataCheckFailed, match="false for all of the first 3 batches"):
        never.update(3)
    strict = expect_all(lambda b: b < 2, within=10)
    strict.update(1)
    with pytest.raises(DataCheckFailed, match="false for batch 2"):
        strict.update(5)
    short = expect_any(lambda b: False, within=50)
    short.update(0)
    with pytest.raises(DataCheckFailed, match="first 1 batch"):
        short.finish()  # a run shorter than the window concludes at its end


def test_data_check_arguments_are_validated():
    with pytest.raises(TypeError, match="callable"):
        expect_any(3)
    with pytest.raises(ValueError, match="within"):
        expect_all(bool, within=0)
    with pytest.raises(ValueError, match="above= and/or below="):
        expect_mean(len)
    with pytest.raises(TypeError, match="bool or a number"):
        expect_any(lambda b: "yes").update(1)


# -- out of memory -----------------------------------------------------------------------


def fake_oom_above(limit: int, calls: list):
    model = nn.Linear(3, 1)

    def forward(micro):
        calls.append(len(micro[0]))
        if len(micro[0]) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return nn.functional.mse_loss(model(micro[0]), micro[1])
    return model, forward


def test_oom_halves_the_micro_batch_and_keeps_the_effective_batch():
    torch.manual_seed(0)
    batch = (torch.randn(16, 3), torch.randn(16, 1))
    calls: list = []
    model, forward = fake_oom_above(5, calls)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    nn.functional.mse_loss(reference(batch[0]), batch[1]).backward()
    changes = []
    micro = MicroBatcher(on_change=lambda old, new, n: changes.append((old, new, n)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = micro.run(batch, forward, optimizers=[optimizer])
    assert changes == [(16, 8, 16), (8, 4, 16)]
    assert calls == [16, 8, 4, 4, 4, 4] and micro.micro_batch == 4
    assert torch.allclose(model.weight.grad, reference.weight.grad, atol=1e-6)
    assert torch.allclose(loss, nn.functional.mse_loss(reference(batch[0]), batch[1]),
                          atol=1e-6)
    assert micro.state_dict() == {"micro_batch": 4}


def test_oom_at_one_sample_and_other_errors_propagate():
    calls: list = []
    _model, forward = fake_oom_above(0, calls)
    micro = MicroBatcher()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        micro.run((torch.randn(4, 3), torch.randn(4, 1)), forward, zero_grad=lambda: None)
    assert calls == [4, 2, 1]

    def broken(micro_batch):
        raise ZeroDivisionError
    with pytest.raises(ZeroDivisionError):
        MicroBatcher().run(torch.ones(4, 1), broken, zero_grad=lambda: None)
    with pytest.raises(ValueError, match="zero_grad"):
        MicroBatcher().run(torch.ones(4, 1), broken)


def test_run_accumulate_logs_the_change_and_checkpoints_the_micro_batch(tmp_path):
    calls: list = []
    model, forward = fake_oom_above(2, calls)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for _step in run.steps(2):
            opt.zero_grad()
            run.accumulate((torch.randn(8, 3), torch.randn(8, 1)), forward)
            opt.step()
        assert run.micro_batch == 2
    assert [(e["micro_batch"], e["batch"]) for e in events(tmp_path, "oom")] == [(4, 8), (2, 8)]
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(model=model, optimizer=opt)
        assert run.micro_batch == 2  # a resumed run does not hit the same OOM first


def test_batches_split_along_the_first_dimension():
    batch = {"x": torch.arange(10).view(5, 2), "meta": "keep", "pair": (torch.arange(5), [1])}
    assert batch_length(batch) == 5
    part = slice_batch(batch, 1, 3)
    assert part["x"].tolist() == [[2, 3], [4, 5]] and part["meta"] == "keep"
    assert part["pair"][0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="disagree"):
        batch_length((torch.ones(3), torch.ones(4)))
    with pytest.raises(TypeError, match="cannot split"):
        batch_length(["a", "b"])


def test_only_parameters_are_checked_for_nan_not_masks():
    from trainguard.run.committer import parameters_finite

    model = nn.Linear(2, 2)
    model.register_buffer("mask", torch.full((2, 2), float("-inf")))  # an attention mask
    assert parameters_finite({"model": model, "other": {"x": 1}})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not parameters_finite({"model": model})


def test_leaving_the_loop_after_a_nan_does_not_save_it(tmp_path):
    loader, model, opt = regression()
    with Run(tmp_path, save_every_steps=2, **FAST) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(8):
            if step == 3:
                with torch.no_grad():
                    model.weight.fill_(float("nan"))
                run.log(loss=float("nan"))
                break
            run.log(loss=1.0)
    assert [(i.step, i.reason) for i in CheckpointManager(tmp_path).list()] == [(2, "periodic")]
