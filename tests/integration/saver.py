"""Child process for the kill -9 tests: saves deterministic states forever.

Usage: python -m tests.integration.saver RUN_DIR

It resumes after the newest valid step, saves step after step (each state derived from
its step number alone, so the parent can rebuild the expected values), mutates the
tensors as soon as ``save`` returns (the background write must not see that), prints
``committed N`` after each save's ``wait()``, and runs retention (keep_last(2)) so kills also
land in the middle of deletions.
"""

from __future__ import annotations

import sys

import torch

from trainguard import CheckpointManager, keep_last

SHAPES = [(512, 512), (1024, 300), (77,), (256, 256), (3, 5, 7)]


def state_for(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    tensors = {f"t{i}": torch.randn(shape, generator=gen) for i, shape in enumerate(SHAPES)}
    tensors["half"] = torch.randn(4096, generator=gen).half()
    return {"tensors": tensors, "step": step, "meta": {"name": f"s{step}", "k": [step, -step]}}


def empty_state() -> dict:
    template = state_for(0)
    template["tensors"] = {k: torch.zeros_like(v) for k, v in template["tensors"].items()}
    template["step"], template["meta"] = -1, {}
    return template


def main(run_dir: str) -> None:
    mgr = CheckpointManager(run_dir, keep=keep_last(2), max_shard_bytes=1 << 20)
    latest = mgr.latest_valid()
    step = latest.step + 1 if latest else 0
    print("ready", flush=True)
    while True:
        state = state_for(step)
        handle = mgr.save(step, state)  # returns after the snapshot; writes in background
        for tensor in state["tensors"].values():
            tensor.mul_(-3.0)  # mutating right away must not change what is saved
        handle.wait()
        print(f"committed {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1])
