"""Save / restore FSDP2-sharded state on N gloo ranks (CPU), for test_distributed_sharded.

Usage: python sharded_worker.py MODE WORLD RUN_DIR OUT_DIR [STEP]

* ``save``: build a model (seed 0), FSDP2-shard it over WORLD ranks, take one AdamW
  step, save it as STEP; rank 0 also writes the full tensors to OUT_DIR/expected.pt.
  With TG_SLOW_RANK=r, rank r sleeps before writing its shard and records whether a
  manifest existed then. With TG_KILL_RANK=r, rank r kills itself (SIGKILL) mid-save.
* ``load``: build the model with another seed, shard it over WORLD ranks, restore,
  and write the full tensors to OUT_DIR/loaded-WORLD.pt (rank 0).
"""

import os
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainguard.checkpoint import distributed as tgd
from trainguard.run.distributed import ModelOptimizerState
from trainguard.store import LocalStore


def build(seed: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def full(state: dict) -> dict:
    """Every tensor of the state, gathered whole (a collective for DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    model_sd, optim_sd = get_state_dict(state["app"].model, state["app"].optimizer)
    for name, value in model_sd.items():
        out[f"model.{name}"] = value.full_tensor()
    for pname, entries in optim_sd["state"].items():
        for key, value in entries.items():
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[f"optim.{pname}.{key}"] = value
    out["extra"] = state["extra"].clone()
    out["counters"] = torch.tensor(state["counters"]["seen"])
    return out


def arm_faults(rank: int) -> None:
    slow, kill = os.environ.get("TG_SLOW_RANK"), os.environ.get("TG_KILL_RANK")
    original = tgd.TrainguardWriter.write_data

    def write_data(self, plan, planner):
        if slow is not None and int(slow) == rank:
            time.sleep(1.5)
            with open(os.path.join(sys.argv[4], "slow.txt"), "w") as fh:
                fh.write(f"{int(self.store.exists(f'{self.key}/manifest.json'))}\n")
        if kill is not None and int(kill) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(self, plan, planner)
        if slow is not None and int(slow) == rank:
            with open(os.path.join(sys.argv[4], "slow.txt"), "a") as fh:
                fh.write(f"{time.time()}\n")
        return result

    tgd.TrainguardWriter.write_data = write_data


def worker(rank: int, world: int, init: str, mode: str, run_dir: str, out: str, step: int):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")  # checkpoint collectives: their own group
    store = LocalStore(run_dir)
    seed = 0 if mode == "save" else 123
    model, opt = build(seed, world)
    state = {"app": ModelOptimizerState(model, opt), "extra": torch.arange(5.0) * (seed + 1),
             "counters": {"seen": 7 if mode == "save" else 0}}
    if mode == "save":
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        expected = full(state)
        arm_faults(rank)
        tgd.save_state_sharded(store, step, state, process_group=group,
                               metrics={"loss": 1.0})
        if rank == 0:
            torch.save(expected, os.path.join(out, "expected.pt"))
    else:
        from trainguard.checkpoint import CheckpointManager

        info = CheckpointManager(store).latest_valid()
        tgd.restore_state_sharded(store, state, info.step, info.manifest, process_group=group)
        loaded = full(state)
        if rank == 0:
            torch.save(loaded, os.path.join(out, f"loaded-{world}.pt"))
    dist.barrier(group)
    dist.destroy_process_group()


def main() -> None:
    mode, world, run_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    step = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    init = tempfile.mktemp(prefix="tg-dist-init-")
    mp.spawn(worker, args=(world, init, mode, run_dir, out, step), nprocs=world)


if __name__ == "__main__":
    main()
