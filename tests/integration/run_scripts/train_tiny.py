"""A tiny, deterministic training run under ``Run``, for the integration tests.

Usage: python -m tests.integration.run_scripts.train_tiny RUN_DIR [options]

A small MLP with dropout, AdamW, a StepLR schedule and a shuffled ResumableLoader whose
epochs end mid-run, so an exact resume needs the weights, the optimizer moments, the
schedule, the RNG streams (dropout) and the data position all restored. It prints
``begin N`` when step N's body starts and ``step N`` when it ends (flushed), so the parent
can act at chosen steps. Options make it misbehave on purpose (see ``parse``).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from torch import nn

from trainguard import keep_last
from trainguard.run import ResumableLoader, Run
from trainguard.store import LocalStore


class SlowStore(LocalStore):
    """Announces each tensor shard it writes and pauses before writing it, from a given
    step on: a kill sent on the announcement lands in the middle of a save."""

    def __init__(self, root: str, slow_from: int) -> None:
        super().__init__(root)
        self.slow_from = slow_from

    def write(self, key, data):
        if key.startswith("checkpoints/") and key.endswith(".safetensors"):
            step = int(key.split("/")[1].removeprefix("step-"))
        else:
            step = -1
        if step >= self.slow_from:
            print(f"writing {step} {key}", flush=True)
            time.sleep(0.5)
        return super().write(key, data)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--total", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--slow-save-from", type=int, default=None,
                        help="announce and slow down the saves of this step and later ones")
    parser.add_argument("--wait-signal-at", type=int, default=None,
                        help="in this step's body, wait until a preemption signal arrives")
    parser.add_argument("--hang-at", type=int, default=None, help="hang in this step's body")
    parser.add_argument("--raise-at", type=int, default=None, help="raise in this step's body")
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="seconds each step takes on top of its work")
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--progress", type=float, default=30.0)
    return parser.parse_args()


def main() -> None:
    args = parse()
    # The ops used here are deterministic on CPU; torch.use_deterministic_algorithms would
    # only add a second of imports (inductor) to every child process.
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every stream seeded: the reference run is reproducible too
    np.random.seed(0)
    random.seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(100, 16), torch.randint(0, 4, (100,)))
    loader = ResumableLoader(data, batch_size=8, shuffle=True, seed=3)  # 13 batches/epoch
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    store = args.run_dir if args.slow_save_from is None else SlowStore(args.run_dir,
                                                                          args.slow_save_from)
    with Run(store, save_every_steps=args.save_every, keep=keep_last(3), log_every_steps=1,
             tensorboard=False, heartbeat_seconds=args.heartbeat,
             progress_every_seconds=args.progress) as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=loader)
        for step, (x, y) in run.steps(args.total, data=loader):
            print(f"begin {step}", flush=True)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.log(loss=loss)
            time.sleep(args.step_sleep)
            if step == args.wait_signal_at:
                print(f"waiting {step}", flush=True)
                deadline = time.monotonic() + 60
                while not run.preempted and time.monotonic() < deadline:
                    time.sleep(0.01)
            if step == args.hang_at:
                time.sleep(3600)
            if step == args.raise_at:
                raise ValueError(f"boom at step {step}")
            print(f"step {step}", flush=True)


if __name__ == "__main__":
    main()
