"""A job that prints its own ``loss=...`` lines while a Run commits every step.

    loud.py --steps 100000 --sleep 0.05

Small on purpose (one tensor, no optimizer): the foreground tests watch its output, its
commits and how it stops, not its training.
"""

import argparse
import os
import time

import torch

from trainguard import Run

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100000)
parser.add_argument("--sleep", type=float, default=0.05)
args = parser.parse_args()

weights = torch.zeros(4)
with Run(os.environ["TRAINGUARD_RUN_DIR"], save_every_steps=1, heartbeat_seconds=0.2,
         tensorboard=False) as run:
    start = run.track(weights=weights)
    print(f"resumed after step {start}", flush=True)
    for step in run.steps(args.steps):
        weights += 1
        print(f"loss={1.0 / step:.4f} step={step}", flush=True)
        time.sleep(args.sleep)
print(f"finished at step {run.step}", flush=True)
