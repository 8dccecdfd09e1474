"""FSDP2 training (gloo, CPU) under ``trainguard.Run``, for test_distributed: sharded saves
every 2 steps, in the background, optionally mirrored to a second tier.

Usage (2 ranks): python -m torch.distributed.run --standalone --nproc-per-node 2
    fsdp_run.py RUN_DIR TOTAL OUT_FILE [MIRROR_URL]

Rank 0 writes the final full tensors (as ``sharded_worker.full``) to OUT_FILE.
"""

import sys

import torch
import torch.distributed as dist
from sharded_worker import build, full

from trainguard import Run
from trainguard.run.distributed import ModelOptimizerState


def main() -> None:
    run_dir, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mirror = sys.argv[4] if len(sys.argv) > 4 else None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build(0, dist.get_world_size())
    state = {"app": ModelOptimizerState(model, opt), "extra": torch.arange(5.0),
             "counters": {"seen": 7}}
    with Run(run_dir, save_every_steps=2, mirror=mirror) as run:
        run.track(**state)
        for step in run.steps(total):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 * step + rank))
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()  # changes the shards a background save of the last step staged
            run.log(loss=loss)
    final = full(state)
    if rank == 0:
        torch.save(final, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
