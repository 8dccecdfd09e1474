"""A torchrun worker that exits with the code given for its local rank and attempt.

    exit_codes.py FIRST [LATER]      e.g.  exit_codes.py 75,75 0,0

FIRST: exit codes by local rank on the first attempt; LATER: on every later attempt
(default: 0 on every rank). Each rank counts its attempts in RUN/attempts-<rank>.

The ranks meet (files in the run dir) before exiting, and ignore SIGTERM: torchrun's
agent SIGTERMs the other workers as soon as one exits non-zero, and a worker killed
before it exits records no code. Real workers reach the same state by saving on the
preemption signal and exiting 75 together.
"""

import os
import signal
import sys
import time
from pathlib import Path

signal.signal(signal.SIGTERM, signal.SIG_IGN)
rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
run_dir = Path(os.environ["TRAINGUARD_RUN_DIR"])
run_dir.mkdir(parents=True, exist_ok=True)
counter = run_dir / f"attempts-{rank}"
attempt = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(attempt))

(run_dir / f"arrived-{attempt}-{rank}").touch()
deadline = time.monotonic() + 60
while len(list(run_dir.glob(f"arrived-{attempt}-*"))) < world and time.monotonic() < deadline:
    time.sleep(0.02)

codes = sys.argv[1] if attempt == 1 else (sys.argv[2] if len(sys.argv) > 2 else "")
code = int(codes.split(",")[rank]) if codes else 0
print(f"rank {rank} attempt {attempt} exits {code}", flush=True)
sys.exit(code)
