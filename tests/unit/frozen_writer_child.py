"""Writer A of the frozen-writer test: saves step 1, then freezes itself mid-save of step 2.

Usage: python frozen_writer_child.py URL POINT, POINT one of

* ``midsave``: stop right after step 2's state file is written (files written, nothing
  checked or published yet);
* ``publish``: stop right before step 2's manifest is published (after every check a
  writer makes before publishing, the lease check included).

It stops with SIGSTOP (every thread, the lease renewer included), as a process that is
swapped out, paused by a debugger or stuck in a long GC would. The test resumes it with
SIGCONT. Its last line says what became of step 2: ``COMMITTED 2`` or ``FAILED ...``.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from trainguard import CheckpointManager
from trainguard.store.object import ObjectStore

STEP2 = "checkpoints/step-000000002/"


def freeze() -> None:
    print("FROZEN", flush=True)
    # Aimed at this very thread: it stops before its next instruction. (os.kill picks any
    # thread to take the signal, and this one could run on for a moment and send the
    # request it was about to send.)
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    print("RESUMED", flush=True)


def main(url: str, point: str) -> None:
    store = ObjectStore(url)
    write, create = store.write, getattr(store, "create", None)

    def hooked_write(key, data):
        if point == "publish" and key == STEP2 + "manifest.json":
            freeze()
        written = write(key, data)
        if point == "midsave" and key.startswith(STEP2 + "state") and key.endswith(".json"):
            freeze()
        return written

    def hooked_create(key, data):
        if point == "publish" and key == STEP2 + "manifest.json":
            freeze()
        return create(key, data)

    store.write = hooked_write
    if create is not None:
        store.create = hooked_create
    mgr = CheckpointManager(store)
    mgr.save(1, {"w": torch.full((64,), 1.0)}, blocking=True)
    print("SAVED 1", flush=True)
    try:
        mgr.save(2, {"w": torch.full((64,), -2.0)}, blocking=True)
        print("COMMITTED 2", flush=True)
    except Exception as exc:  # reported to the test
        cause = exc.__cause__ or exc
        print(f"FAILED {type(exc).__name__} {type(cause).__name__}: {exc}", flush=True)
    try:
        mgr.close()
    except Exception:  # the failure above was reported already
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
