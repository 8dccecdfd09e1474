"""A small training job for the launcher tests, steered by its arguments.

    job.py --steps 40 --sleep 0.05 [--crash-attempts 2 --crash-at 12] [--hang-at 8]

It counts its attempts in RUN/attempts.txt, resumes through trainguard.Run, and on the
attempts listed crashes (an exception) or hangs (sleeps, heartbeat goes stale).
"""

import argparse
import os
import time

import torch

from trainguard.run import Run

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--sleep", type=float, default=0.05)
parser.add_argument("--crash-attempts", type=int, default=0)
parser.add_argument("--crash-at", type=int, default=12)
parser.add_argument("--hang-at", type=int, default=0)
args = parser.parse_args()

run_dir = os.environ["TRAINGUARD_RUN_DIR"]
os.makedirs(run_dir, exist_ok=True)
counter = os.path.join(run_dir, "attempts.txt")
attempt = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(attempt))

torch.manual_seed(0)
model = torch.nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
with Run(run_dir, save_every_steps=5, heartbeat_seconds=0.2) as run:
    start = run.track(model=model, optimizer=opt)
    print(f"attempt {attempt} starts after step {start}", flush=True)
    for step in run.steps(args.steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(loss=loss.item())
        time.sleep(args.sleep)
        if attempt <= args.crash_attempts and step == args.crash_at:
            raise RuntimeError(f"injected crash at step {step} on attempt {attempt}")
        if attempt == 1 and step == args.hang_at:
            time.sleep(3600)  # hung: the heartbeat thread lives on, progress stops
print(f"attempt {attempt} finished at step {run.step}", flush=True)
