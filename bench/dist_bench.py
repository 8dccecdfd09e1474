"""Sharded save/restore throughput vs. the number of ranks writing in parallel (gloo, CPU).

Each run shards the same total state (DTensors, Shard(0) over a 1-D CPU mesh) across
N processes, saves it through trainguard's DCP writer (every rank writes its shard;
rank 0 commits last), then restores it on the same N ranks. Not a timed test.

    python bench/dist_bench.py --mib 256 --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, init: str, run_dir: str, mib: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from trainguard.checkpoint import CheckpointManager
    from trainguard.checkpoint.dcp import restore_state_sharded, save_state_sharded
    from trainguard.store import LocalStore

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")
    mesh = init_device_mesh("cpu", (world,))
    rows = mib * (1 << 20) // 4 // 4096 // 8  # 8 tensors of [rows, 4096] float32
    state = {f"w{i}": distribute_tensor(torch.full((rows, 4096), float(i)), mesh, [Shard(0)])
             for i in range(8)}
    store = LocalStore(run_dir)
    dist.barrier(group)
    t0 = time.perf_counter()
    save_state_sharded(store, 1, state, process_group=group)
    dist.barrier(group)
    t1 = time.perf_counter()
    info = CheckpointManager(store).latest_valid()
    restore_state_sharded(store, state, 1, info.manifest, process_group=group)
    dist.barrier(group)
    t2 = time.perf_counter()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"save": t1 - t0, "restore": t2 - t1, "bytes": info.total_bytes}, fh)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="total state size")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    print(f"{'ranks':>5} {'MiB':>6} {'save s':>7} {'save MiB/s':>10} {'restore s':>9} "
          f"{'restore MiB/s':>13}")
    for world in args.ranks:
        base = tempfile.mkdtemp(prefix="tg-dist-bench-", dir=args.dir)
        out = os.path.join(base, "result.json")
        mp.spawn(worker, args=(world, os.path.join(base, "init"), os.path.join(base, "run"),
                               args.mib, out), nprocs=world)
        res = json.load(open(out))
        mib = res["bytes"] / (1 << 20)
        print(f"{world:>5} {mib:>6.0f} {res['save']:>7.2f} {mib / res['save']:>10.0f} "
              f"{res['restore']:>9.2f} {mib / res['restore']:>13.0f}", flush=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
