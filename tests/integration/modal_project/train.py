"""A small training script for the local Modal control plane's journeys.

It reads ``config.json`` by a relative path (shipped only with ``--add-local``), imports
a local module (``helpers_modal``, shipped by the import analysis), prints a digest of
``$SECRET_TOKEN`` (never the value), and trains under ``trainguard.Run``, printing
``RESUMED n`` at its start and ``STEP n`` after each step.

Options: ``--steps N``, ``--save-every K``, ``--sleep S`` (seconds per step),
``--crash-at N`` (raise at step N, only in an attempt that started from scratch),
``--hold-at N --hold-file PATH`` (from step N on, wait for PATH to exist: the journey
preempts it there, however slow the machine; a preemption still ends the wait).
"""

import argparse
import hashlib
import json
import os
import time

import helpers_modal
import torch
from torch import nn

from trainguard import Run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.2)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--hold-file", default="")
    args = parser.parse_args()
    with open("config.json") as handle:
        config = json.load(handle)
    secret = os.environ.get("SECRET_TOKEN", "")
    print("CONFIG", config["name"], "SECRET", hashlib.sha256(secret.encode()).hexdigest()[:12],
          flush=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    with Run(save_every_steps=args.save_every, tensorboard=False) as run:
        start = run.track(model=model, optimizer=optimizer)
        print("RESUMED", start, flush=True)
        for step in run.steps(args.steps):
            loss = helpers_modal.loss(model, torch.randn(8, 4))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log(loss=loss)
            if step == args.crash_at and start == 0:
                raise RuntimeError(f"crash at step {step}, on purpose")
            print("STEP", step, flush=True)
            time.sleep(args.sleep)
            while (args.hold_at is not None and step >= args.hold_at and not run.preempted
                   and not os.path.exists(args.hold_file)):
                time.sleep(0.05)


if __name__ == "__main__":
    main()
