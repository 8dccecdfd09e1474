"""Save / restore FSDP2-sharded state on N gloo ranks (CPU), for test_distributed.

Usage: python sharded_worker.py MODE WORLD RUN_DIR OUT_DIR [STEP]

Every mode goes through the Run's ``DistributedManager`` (background sharded saves);
with TG_MIRROR=URL its manager has that second tier.

* ``save``: build a model (seed 0), FSDP2-shard it over WORLD ranks, take one AdamW
  step, save it as STEP; rank 0 also writes the full tensors to OUT_DIR/expected.pt.
  With TG_SLOW_RANK=r, rank r sleeps before writing its shard and records whether a
  manifest existed then. With TG_KILL_RANK=r, rank r kills itself (SIGKILL) inside its
  background write, after its save call returned (it writes OUT_DIR/returned-r first).
* ``load``: build the model with another seed, shard it over WORLD ranks, restore,
  and write the full tensors to OUT_DIR/loaded-WORLD.pt (rank 0).
* ``gated``: as ``save``, but every rank's write waits until the save call has
  returned and the training state has been changed in place; OUT_DIR/gated-RANK.json
  records what the caller saw when the call returned.
* ``fail``: commit STEP, then rank 1's writes raise; OUT_DIR/fail-RANK.json records what
  the next ``save``, ``wait`` and ``close`` raised after each failed background save.
"""

import json
import os
import signal
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainguard.checkpoint import CheckpointManager
from trainguard.checkpoint import dcp as tgd
from trainguard.errors import CheckpointError
from trainguard.run.distributed import DistributedManager, ModelOptimizerState

#: Set by the main thread once ``save`` returned; the armed writes wait for it.
RETURNED = threading.Event()


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


def arm_faults(rank: int, out: str) -> None:
    slow, kill = os.environ.get("TG_SLOW_RANK"), os.environ.get("TG_KILL_RANK")
    gated, fail = os.environ.get("TG_GATED"), os.environ.get("TG_FAIL_RANK")
    original = tgd.TrainguardWriter.write_data

    def write_data(self, plan, planner):
        if slow is not None and int(slow) == rank:
            time.sleep(1.5)
            with open(os.path.join(out, "slow.txt"), "w") as fh:
                fh.write(f"{int(self.store.exists(f'{self.key}/manifest.json'))}\n")
        if gated or (kill is not None and int(kill) == rank):
            # Only a save that returned before its write can pass: a blocking one would
            # hold the main thread inside save() and fail here.
            if not RETURNED.wait(60):
                raise RuntimeError("save() did not return before its background write")
        if kill is not None and int(kill) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if fail is not None and int(fail) == rank:
            raise RuntimeError(f"injected write failure on rank {rank}")
        result = original(self, plan, planner)
        if slow is not None and int(slow) == rank:
            with open(os.path.join(out, "slow.txt"), "a") as fh:
                fh.write(f"{time.time()}\n")
        return result

    tgd.TrainguardWriter.write_data = write_data


def mutate(state: dict) -> None:
    """Change every saved tensor in place, as the next training step would."""
    app = state["app"]
    with torch.no_grad():
        for param in app.model.parameters():
            param.add_(1000.0)
        for entries in app.optimizer.state.values():
            for value in entries.values():
                value.add_(1000.0)
        state["extra"].add_(1000.0)


def outcome(call) -> str:
    try:
        call()
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    return "ok"


def save(mgr, state, rank: int, out: str, step: int) -> None:
    handle = mgr.save(step, state, metrics={"loss": 1.0})
    with open(os.path.join(out, f"returned-{rank}"), "w") as fh:
        fh.write(f"{int(handle.done())}\n")
    RETURNED.set()
    mgr.close()


def gated(mgr, state, rank: int, out: str, step: int, run_dir: str) -> None:
    handle = mgr.save(step, state, metrics={"loss": 1.0})
    seen = {"done": handle.done(),
            "manifest": os.path.exists(os.path.join(
                run_dir, f"checkpoints/step-{step:09d}/manifest.json"))}
    mutate(state)  # while this rank's write is held back: it must not see these values
    RETURNED.set()
    info = handle.wait()
    seen["committed"] = info.step
    mgr.close()
    with open(os.path.join(out, f"gated-{rank}.json"), "w") as fh:
        json.dump(seen, fh)


def fail(mgr, state, rank: int, out: str, step: int) -> None:
    mgr.save(step, state, blocking=True)
    os.environ["TG_FAIL_RANK"] = "1"
    arm_faults(rank, out)
    seen = {}
    mgr.save(step + 1, state)
    seen["save"] = outcome(lambda: mgr.save(step + 2, state))  # not started: raises first
    seen["again"] = outcome(lambda: mgr.save(step + 2, state))  # no failure pending now
    seen["wait"] = outcome(mgr.wait)
    mgr.save(step + 3, state)
    seen["close"] = outcome(mgr.close)
    with open(os.path.join(out, f"fail-{rank}.json"), "w") as fh:
        json.dump(seen, fh)


def worker(rank: int, world: int, init: str, mode: str, run_dir: str, out: str, step: int):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    mgr = DistributedManager(CheckpointManager(run_dir, mirror=os.environ.get("TG_MIRROR")))
    mgr.acquire_writer()
    seed = 0 if mode != "load" else 123
    model, opt = build(seed, world)
    state = {"app": ModelOptimizerState(model, opt), "extra": torch.arange(5.0) * (seed + 1),
             "counters": {"seen": 7 if mode != "load" else 0}}
    if mode == "load":
        assert mgr.restore(state) == step
        loaded = full(state)
        mgr.close()
        if rank == 0:
            torch.save(loaded, os.path.join(out, f"loaded-{world}.pt"))
    else:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        expected = full(state)
        if rank == 0:
            torch.save(expected, os.path.join(out, "expected.pt"))
        if mode == "fail":
            fail(mgr, state, rank, out, step)
        else:
            if mode == "gated":
                os.environ["TG_GATED"] = "1"
            arm_faults(rank, out)
            if mode == "gated":
                gated(mgr, state, rank, out, step, run_dir)
            else:
                save(mgr, state, rank, out, step)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    mode, world, run_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    step = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    init = tempfile.mktemp(prefix="tg-dist-init-")
    mp.spawn(worker, args=(world, init, mode, run_dir, out, step), nprocs=world)


if __name__ == "__main__":
    main()
