"""Checkpoint save/load benchmark: trainguard against common methods and the disk floor.

One run builds one CPU model (an ``nn.Sequential`` of float32 ``nn.Linear(d, d)`` layers,
``--size-gb`` of parameters) and, for each method, saves it durably and loads it back:

* ``torch.save``   -- one file, flush + ``os.fsync``; load ``torch.load(weights_only=True)``.
* ``safetensors``  -- ``save_file`` + ``os.fsync``; load ``load_file``.
* ``dcp``          -- ``torch.distributed.checkpoint.save/load`` without a process group
  (its ``FileSystemWriter`` fsyncs data and metadata files by default).
* ``trainguard``   -- ``CheckpointManager.save(...).wait()`` / ``restore`` (checksummed).

Every load ends with ``load_state_dict`` (trainguard restores in place) into a zeroed
model, and is then checked tensor by tensor with ``torch.equal`` against the saved model.

Floors, measured in the same run on the same directory and byte count:
write = ``dd if=/dev/zero bs=64M oflag=direct``, read = ``dd bs=64M iflag=direct``.
Before every load and the read floor the page cache is dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``, needs root) so reads are cold; if that fails the output
says "warm cache". Before every save ``os.sync()`` flushes earlier dirty pages.

Times are wall clock of the whole call; GB = 1e9 bytes of parameters (payload).
``save / floor`` is the method's time over the floor's time for the same bytes
(1.00x = at the disk floor, 2.00x = half its speed). Best of ``--repeat`` runs is
shown; the JSON (printed as ``JSON: {...}``, optionally written to ``--json``) also
has the median and every run.

Run:  python bench/ckpt_bench.py --size-gb 1 [--repeat 3] [--dir /mnt/disk] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trainguard import CheckpointManager

GB = 1e9
DD_BLOCK = 64 << 20


def build_model(size_gb: float, d: int) -> nn.Sequential:
    """Random float32 Linear(d, d) stack with about ``size_gb`` GB of parameters."""
    layer_bytes = (d * d + d) * 4
    n_layers = max(1, round(size_gb * GB / layer_bytes))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(n_layers)])


def payload_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def drop_caches() -> bool:
    """Flush and drop the page cache; False when not permitted (warm cache)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# -- methods: save(model, dir) writes durably; load(target, dir) fills target -----------

def torch_save(model: nn.Module, out: Path) -> None:
    out.mkdir(parents=True)
    with open(out / "model.pt", "wb") as f:
        torch.save(model.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(target: nn.Module, out: Path) -> None:
    sd = torch.load(out / "model.pt", weights_only=True)
    target.load_state_dict(sd)


def st_save(model: nn.Module, out: Path) -> None:
    out.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(out / "model.safetensors"))
    fsync_file(out / "model.safetensors")


def st_load(target: nn.Module, out: Path) -> None:
    sd = safetensors.torch.load_file(str(out / "model.safetensors"))
    target.load_state_dict(sd)


def dcp_save(model: nn.Module, out: Path) -> None:
    with warnings.catch_warnings():  # "assuming ... single process"
        warnings.simplefilter("ignore")
        dcp.save(model.state_dict(), checkpoint_id=str(out))


def dcp_load(target: nn.Module, out: Path) -> None:
    sd = target.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(out))
    target.load_state_dict(sd)


def tg_save(model: nn.Module, out: Path) -> None:
    mgr = CheckpointManager(str(out))
    try:
        mgr.save(1, {"model": model}).wait()
    finally:
        mgr.close()


def tg_load(target: nn.Module, out: Path) -> None:
    mgr = CheckpointManager(str(out))
    try:
        assert mgr.restore({"model": target}) == 1
    finally:
        mgr.close()


METHODS = {
    "torch.save": (torch_save, torch_load),
    "safetensors": (st_save, st_load),
    "dcp": (dcp_save, dcp_load),
    "trainguard": (tg_save, tg_load),
}


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def check_and_zero(model: nn.Module, target: nn.Module, method: str) -> None:
    """Fail unless target holds exactly model's tensors, then zero target again."""
    ref, got = model.state_dict(), target.state_dict()
    assert ref.keys() == got.keys(), f"{method}: loaded keys differ"
    for key, tensor in ref.items():
        assert torch.equal(tensor, got[key]), f"{method}: {key} differs after load"
    zero(target)


def zero(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()


def run_method(name: str, model: nn.Module, target: nn.Module, out: Path) -> dict:
    """One save + cold load of ``name`` into a fresh directory, verified, then removed."""
    save, load = METHODS[name]
    os.sync()
    save_s = timed(save, model, out)
    on_disk = dir_bytes(out)
    cold = drop_caches()
    load_s = timed(load, target, out)
    check_and_zero(model, target, name)
    shutil.rmtree(out)
    return {"save_s": save_s, "load_s": load_s, "disk_bytes": on_disk, "cold": cold}


def dd(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def run_floor(nbytes: int, work: Path) -> dict:
    """dd write (O_DIRECT) and cold dd read (O_DIRECT) of about ``nbytes``."""
    count = max(1, round(nbytes / DD_BLOCK))
    path = work / "dd-floor.bin"
    os.sync()
    write_s = dd("if=/dev/zero", f"of={path}", "bs=64M", f"count={count}", "oflag=direct")
    cold = drop_caches()
    read_s = dd(f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct")
    path.unlink()
    return {"bytes": count * DD_BLOCK, "write_s": write_s, "read_s": read_s, "cold": cold}


def summarize(runs: list[dict], key: str, nbytes: int) -> dict:
    times = [r[key] for r in runs]
    best = min(times)
    return {"best_s": best, "median_s": statistics.median(times), "all_s": times,
            "best_gbps": nbytes / best / GB}


def fmt_row(name: str, save: dict | None, save_floor: float | None,
            load: dict | None, load_floor: float | None) -> str:
    def cells(stat, floor_gbps):
        if stat is None:
            return ["-", "-", "-"]
        ratio = f"{floor_gbps / stat['best_gbps']:.2f}x" if floor_gbps else "-"
        return [f"{stat['best_s']:.2f}", f"{stat['best_gbps']:.2f}", ratio]
    cols = [name] + cells(save, save_floor) + cells(load, load_floor)
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cols, WIDTHS)) + " |"


HEADER = ["method", "save s", "save GB/s", "save / disk floor",
          "load s", "load GB/s", "load / read floor"]
WIDTHS = [len(h) if i else 16 for i, h in enumerate(HEADER)]


def print_table(result: dict) -> None:
    print("| " + " | ".join(h.rjust(w) for h, w in zip(HEADER, WIDTHS)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|")
    wf, rf = result["floor"]["write"], result["floor"]["read"]
    print(fmt_row("dd write floor", wf, wf["best_gbps"], None, None))
    print(fmt_row("dd read floor", None, None, rf, rf["best_gbps"]))
    for name, res in result["methods"].items():
        print(fmt_row(name, res["save"], wf["best_gbps"], res["load"], rf["best_gbps"]))


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    model = build_model(args.size_gb, args.d)
    target = nn.Sequential(*[nn.utils.skip_init(nn.Linear, args.d, args.d) for _ in model])
    zero(target)  # the load target starts all zeros (and is zeroed after each check)
    nbytes = payload_bytes(model)
    floors, runs = [], {name: [] for name in METHODS}
    for rep in range(args.repeat):
        floors.append(run_floor(nbytes, work))
        for name in METHODS:
            runs[name].append(run_method(name, model, target, work / f"{name}-{rep}"))
            print(f"rep {rep + 1}/{args.repeat} {name}: save {runs[name][-1]['save_s']:.2f}"
                  f" s, load {runs[name][-1]['load_s']:.2f} s", flush=True)
    fb = floors[0]["bytes"]
    cold = all(r["cold"] for r in floors + [x for v in runs.values() for x in v])
    return {
        "size_bytes": nbytes, "layers": len(model), "d": args.d, "repeat": args.repeat,
        "dir": str(work), "cache": "cold" if cold else "warm cache",
        "torch": torch.__version__, "safetensors": safetensors.__version__,
        "floor": {"bytes": fb, "write": summarize(floors, "write_s", fb),
                  "read": summarize(floors, "read_s", fb)},
        "methods": {name: {"save": summarize(r, "save_s", nbytes),
                           "load": summarize(r, "load_s", nbytes),
                           "disk_bytes": r[0]["disk_bytes"]} for name, r in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="parameter GB (1e9 B)")
    parser.add_argument("--dir", default=None,
                        help="parent directory for the files (a temp dir is made inside "
                             "it and removed afterwards); default /tmp")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (best shown)")
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    parser.add_argument("--d", type=int, default=4096, help="Linear width (default 4096)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt_bench-", dir=args.dir or "/tmp"))
    try:
        result = benchmark(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{result['size_bytes'] / GB:.3f} GB of float32 parameters "
          f"({result['layers']} x Linear({args.d}, {args.d})), best of {args.repeat}, "
          f"{result['cache']} loads, dir {work} (removed)\n")
    print_table(result)
    doc = json.dumps(result, separators=(",", ":"))
    print("JSON: " + doc)
    if args.json:
        Path(args.json).write_text(doc + "\n")


if __name__ == "__main__":
    main()
