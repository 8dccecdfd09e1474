"""Training loops written the way scripts are written, for the kill -9 tests.

Usage: python -m tests.integration.run_scripts.train_loops RUN_DIR --loop KIND [options]

KIND is one of:

* ``plain``: a plain ``DataLoader(shuffle=True)`` over a dataset that augments in
  ``__getitem__`` (torch, python and numpy RNGs), tracked, ``run.steps(N, data=loader)``;
* ``sampler``: a ``ResumableSampler`` in the script's own ``DataLoader``; the iterator is
  created after ``run.track()`` and re-created at each epoch end, inside a step;
* ``stateful``: torchdata's ``StatefulDataLoader`` (tracked; its own state_dict);
* ``epochs``: ``run.epochs()`` / ``run.batches()`` over a plain DataLoader, a hand-made
  SGD with momentum carried between steps (``run.carry``), epoch-end validation and a
  hand-annealed ``args.lr`` on the tracked ``argparse.Namespace``.

Every model has dropout, so a shifted RNG stream changes the weights. The script prints
``step N`` at the end of each step, and in the epoch loop ``validate E`` before and
``epoch E`` after the epoch-end work (flushed), for the parent to follow.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainguard.run import ResumableSampler, Run


class Augmented(Dataset):
    """100 samples of 16 features; ``augment`` adds noise, flips and scales at random."""

    def __init__(self, augment: bool = True) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(100, 16, generator=generator)
        self.y = torch.randint(0, 4, (100,), generator=generator)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn(16)
            if random.random() < 0.5:
                x = x.flip(0)
            x = x * float(np.random.uniform(0.9, 1.1))
        return x, self.y[i]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--loop", choices=["plain", "sampler", "stateful", "epochs"],
                        required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--drop-last", action="store_true")
    parser.add_argument("--total", type=int, default=36, help="steps (epochs: ignored)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--step-sleep", type=float, default=0.01,
                        help="pace: seconds each step takes on top of its work")
    return parser.parse_args()


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def steps_loop(args: argparse.Namespace, run: Run, model: nn.Module) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dataset = Augmented(augment=args.loop != "stateful")
    if args.loop in ("plain", "stateful"):
        if args.loop == "plain":
            loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=args.workers,
                                drop_last=args.drop_last)
        else:
            from torchdata.stateful_dataloader import StatefulDataLoader

            loader = StatefulDataLoader(dataset, batch_size=8, shuffle=True,
                                        num_workers=args.workers)
        run.track(model=model, optimizer=optimizer, data=loader)
        for step, (x, y) in run.steps(args.total, data=loader):
            run.log(loss=sgd_step(model, optimizer, x, y))
            time.sleep(args.step_sleep)
            print(f"step {step}", flush=True)
    else:  # sampler
        sampler = ResumableSampler(dataset, seed=3)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
        run.track(model=model, optimizer=optimizer, sampler=sampler)
        batches = iter(loader)  # after track(): this draws a seed from the global RNG
        for step in run.steps(args.total):
            try:
                x, y = next(batches)
            except StopIteration:  # the epoch ended: a new iterator draws a seed again
                batches = iter(loader)
                x, y = next(batches)
            run.log(loss=sgd_step(model, optimizer, x, y))
            time.sleep(args.step_sleep)
            print(f"step {step}", flush=True)


@torch.no_grad()
def validate(model: nn.Module, data: Augmented) -> float:
    model.eval()
    loss = nn.functional.cross_entropy(model(data.x[:50]), data.y[:50]).item()
    model.train()
    return loss


def epochs_loop(args: argparse.Namespace, run: Run, model: nn.Module) -> None:
    dataset = Augmented()
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=args.workers,
                        drop_last=args.drop_last)
    args.best = None
    args.validations = 0
    run.track(model=model, args=args, data=loader)
    for epoch in run.epochs(1, args.epochs + 1):
        velocity = run.carried("velocity", [torch.zeros_like(p) for p in model.parameters()])
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p, v in zip(model.parameters(), velocity, strict=True):
                    v.mul_(0.9).add_(p.grad)
                    p.add_(v, alpha=-args.lr)
            run.carry(velocity=velocity)
            run.log(loss=loss)
            time.sleep(args.step_sleep)
            print(f"step {run.step}", flush=True)
        print(f"validate {epoch}", flush=True)
        time.sleep(args.step_sleep * 5)  # a validation long enough to be killed in
        val_loss = validate(model, dataset)
        args.validations += 1
        if args.best is None or val_loss < args.best:
            args.best = val_loss
        else:
            args.lr /= 4.0
        args.lr *= 0.9
        run.log(val_loss=val_loss)
        print(f"epoch {epoch}", flush=True)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every stream seeded: the reference run is reproducible too
    np.random.seed(0)
    random.seed(0)
    model = make_model()
    with Run(args.run_dir, save_every_steps=args.save_every, log_every_steps=1,
             tensorboard=False, wandb=False, heartbeat_seconds=30.0) as run:
        if args.loop == "epochs":
            epochs_loop(args, run, model)
        else:
            steps_loop(args, run, model)


if __name__ == "__main__":
    main()
