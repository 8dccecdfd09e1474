"""A DDP training script (gloo, CPU) under ``trainguard.Run``, for test_distributed_ddp.

Usage (2 ranks): python -m torch.distributed.run --standalone --nproc-per-node 2
    ddp_train.py RUN_DIR TOTAL OUT_FILE [CRASH_STEP MARKER]

With CRASH_STEP, rank 1 kills itself (SIGKILL) at that step the first time (MARKER
records that it did); torchrun's elastic restart then resumes every rank.
Rank 0 writes the final weights and optimizer moments to OUT_FILE.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainguard import Run


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 6, generator=gen)
    return x, x.sum(dim=1, keepdim=True) * 0.5


def main() -> None:
    run_dir, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    crash_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    marker = sys.argv[5] if len(sys.argv) > 5 else None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and RNG stream on every rank
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Run(run_dir, save_every_steps=3) as run:
        run.track(model=model, optimizer=opt)
        for step in run.steps(total):
            x, y = batch(step, rank)
            noise = torch.rand(1) * 1e-3  # the global RNG stream is part of the state
            loss = ((model(x) - y) ** 2).mean() + noise.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(loss=loss)
            if crash_at == step and rank == 1 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        state = {f"w.{k}": v.detach().clone() for k, v in model.module.state_dict().items()}
        for i, entry in opt.state_dict()["state"].items():
            state.update({f"m.{i}.{k}": v.clone() for k, v in entry.items()})
        state["rng"] = torch.get_rng_state()
        torch.save(state, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
