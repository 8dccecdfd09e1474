"""The loops people write, in-process: RNG set at the first resumed step, tracked
``argparse.Namespace``, ``run.epochs()``/``run.batches()`` resumed mid-epoch and after an
epoch's last batch, values carried between steps, and the best checkpoint."""

from __future__ import annotations

import argparse
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainguard import CheckpointManager
from trainguard.run import Run

FAST = {"heartbeat_seconds": 3600.0, "tensorboard": False, "wandb": False}


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def draws(run_dir, stop_at: int | None = None) -> dict[int, float]:
    model, optimizer = tiny()
    out = {}
    with Run(run_dir, save_every_steps=2, **FAST) as run:
        run.track(model=model, optimizer=optimizer)
        iter(DataLoader(TensorDataset(torch.zeros(4)), shuffle=True))  # draws a seed
        for step in run.steps(6):
            out[step] = torch.rand(()).item()
            if step == stop_at:
                break
    return out


def test_rng_is_set_where_the_first_resumed_step_starts_not_in_track(tmp_path):
    reference = draws(tmp_path / "reference")
    assert draws(tmp_path / "resumed", stop_at=3) == {k: reference[k] for k in (1, 2, 3)}
    # The code between track() and the loop drew from the RNG after the restore; the
    # steps still see the streams of an uninterrupted run.
    assert draws(tmp_path / "resumed") == {k: reference[k] for k in (4, 5, 6)}


def test_a_tracked_namespace_restores_what_the_run_changed(tmp_path):
    args = argparse.Namespace(lr=1.0, epochs=3, name="a", func=print)  # func: code, left out
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(args=args)
        for _ in run.steps(2):
            args.lr /= 4
            args.best = 0.5  # added after track(): saved too
    resumed = argparse.Namespace(lr=1.0, epochs=5, name="a")  # a new --epochs
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(args=resumed)
    assert vars(resumed) == {"lr": 1.0 / 16, "epochs": 5, "name": "a", "best": 0.5}


def test_objects_that_cannot_be_restored_are_refused_naming_the_fix(tmp_path):
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        with pytest.raises(TypeError, match=r"attribute 'net' holds a Linear.*run.track\(net="):
            run.track(args=argparse.Namespace(lr=1.0, net=nn.Linear(1, 1)))
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        with pytest.raises(TypeError, match="a float cannot be restored in place"):
            run.track(lr=0.1)


DATA = TensorDataset(torch.randn(20, 4), torch.randint(0, 2, (20,)))  # 5 batches of 4


def train_epochs(run_dir, *, stop_epoch=None, stop_batch=None, signal_at=None):
    """4 epochs over a shuffled DataLoader with momentum carried between steps, epoch-end
    validation and a hand-annealed args.lr. Returns (model, args, seen, run)."""
    model, _ = tiny()
    args = argparse.Namespace(lr=0.2, validations=0, best=None)
    loader = DataLoader(DATA, batch_size=4, shuffle=True)
    seen = []
    with Run(run_dir, save_every_steps=3, **FAST) as run:
        run.track(model=model, args=args, data=loader)
        for epoch in run.epochs(1, 5):
            velocity = run.carried("velocity", [torch.zeros_like(p) for p in model.parameters()])
            for i, (x, y) in run.enumerate(loader):
                seen.append((epoch, i))
                loss = nn.functional.cross_entropy(model(x), y)
                model.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for p, v in zip(model.parameters(), velocity, strict=True):
                        p.sub_(v.mul_(0.9).add_(p.grad), alpha=args.lr)
                run.carry(velocity=velocity)
                if (epoch, i) == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # preempted in this step
                if (epoch, i) == (stop_epoch, stop_batch):
                    return model, args, seen, run  # leaves the with: an exit save
            with torch.no_grad():
                model.eval()
                val_loss = nn.functional.cross_entropy(model(DATA.tensors[0]),
                                                       DATA.tensors[1]).item()
                model.train()
            args.validations += 1
            if args.best is None or val_loss < args.best:
                args.best = val_loss
            else:
                args.lr /= 4
            run.log(val_loss=val_loss)
    return model, args, seen, run


def assert_same(model, args, reference, reference_args):
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert vars(args) == vars(reference_args)
    assert args.validations == 4  # epoch-end work counted once per epoch


def test_epochs_resume_mid_epoch_bit_exact(tmp_path):
    reference, reference_args, reference_seen, _ = train_epochs(tmp_path / "reference")
    assert len(reference_seen) == 20
    _, _, head, _ = train_epochs(tmp_path / "run", stop_epoch=2, stop_batch=1)
    model, args, tail, run = train_epochs(tmp_path / "run")
    assert run.start_step == 7
    assert head + tail == reference_seen  # the batch index continues after the resume
    assert_same(model, args, reference, reference_args)


def test_epochs_resume_after_the_last_batch_runs_the_epoch_end_once(tmp_path):
    reference, reference_args, _, _ = train_epochs(tmp_path / "reference")
    with pytest.raises(SystemExit) as preempted:  # committed after epoch 2's last batch
        train_epochs(tmp_path / "run", signal_at=(2, 4))
    assert preempted.value.code == 75
    info = CheckpointManager(tmp_path / "run").latest_valid()
    assert info.step == 10 and info.reason == "preempted"
    model, args, seen, _ = train_epochs(tmp_path / "run")
    assert seen[0] == (3, 0)  # epoch 2 had no batch left: only its end work ran
    assert_same(model, args, reference, reference_args)


def test_epoch_ends_are_checkpoints_with_their_validation_and_the_best_restores(tmp_path):
    train_epochs(tmp_path / "run")
    mgr = CheckpointManager(tmp_path / "run")
    ends = [i for i in mgr.list() if i.reason in ("epoch", "final")]
    assert [i.step for i in ends] == [5, 10, 15, 20]
    assert all("val_loss" in i.metrics for i in ends)
    best = mgr.best("val_loss", "min")
    assert best.metrics["val_loss"] == min(i.metrics["val_loss"] for i in ends)
    model, _ = tiny(seed=1)
    with Run(tmp_path / "run", save_every_steps=3, **FAST) as run:
        run.track(model=model, args=argparse.Namespace())
        restored = run.restore_best("val_loss", "min")
    assert restored.step == best.step
    state: dict = {}
    mgr.restore(state, step=best.step)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name])
    assert mgr.latest_valid().step == 20  # restoring the best saved nothing new


def test_batches_refuses_what_it_cannot_resume(tmp_path):
    model, _ = tiny()
    loader = DataLoader(DATA, batch_size=4)
    with Run(tmp_path, save_every_steps=3, **FAST) as run:
        run.track(model=model)
        with pytest.raises(RuntimeError, match="inside `for epoch in run.epochs"):
            run.batches([1, 2])
        for _epoch in run.epochs(1):
            with pytest.raises(ValueError, match=r"track the DataLoader.*data=loader"):
                run.batches(loader)
            list(run.batches(range(3)))
            with pytest.raises(RuntimeError, match="already used in this epoch"):
                run.batches(range(3))
    assert run.step == 3


def test_batches_over_a_range_resume_by_slicing(tmp_path):
    offsets = range(0, 50, 5)
    seen = []
    with Run(tmp_path, save_every_steps=4, **FAST) as run:
        run.track(model=tiny()[0])
        for _epoch in run.epochs(2):
            for i, offset in run.enumerate(offsets):
                seen.append((i, offset))
                if run.step == 6:
                    break
            break
    with Run(tmp_path, save_every_steps=4, **FAST) as run:
        run.track(model=tiny()[0])
        for epoch in run.epochs(2):
            seen += [(epoch, i, offset) for i, offset in run.enumerate(offsets)]
    assert seen[:6] == [(i, 5 * i) for i in range(6)]
    assert seen[6:10] == [(0, i, 5 * i) for i in range(6, 10)]
    assert seen[10:] == [(1, i, 5 * i) for i in range(10)]


def test_a_generator_of_the_scripts_own_is_restored_in_place(tmp_path):
    generator = torch.Generator().manual_seed(3)
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(gen=generator)
        for _ in run.steps(2):
            torch.rand(2, generator=generator)
    expected = torch.rand(2, generator=generator)
    again = torch.Generator().manual_seed(99)
    with Run(tmp_path, save_every_steps=1, **FAST) as run:
        run.track(gen=again)
    assert torch.equal(torch.rand(2, generator=again), expected)


def test_a_nonfinite_loss_in_batches_rolls_back_inside_the_epoch(tmp_path):
    model, _ = tiny()
    seen, failed = [], False
    with Run(tmp_path, save_every_steps=2, **FAST) as run:
        run.track(model=model)
        for _epoch in run.epochs(1):
            for _i, offset in run.enumerate(range(0, 60, 10)):
                seen.append(offset)
                bad = offset == 30 and not failed
                failed = failed or bad
                run.log(loss=float("nan") if bad else 1.0)
    # Rolled back to step 2 (batches 0, 10 done), replayed batch 20, skipped 30.
    assert seen == [0, 10, 20, 30, 20, 40, 50]
    assert run.rollbacks == 1 and run.step == 5
