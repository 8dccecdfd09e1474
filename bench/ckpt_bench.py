"""Checkpoint benchmark: stall, time-to-durable, restore and peak RSS against the floors.

One run builds one CPU model (an ``nn.Sequential`` of float32 ``nn.Linear(d, d)`` layers,
``--size-gb`` of parameters) and, for each method of ``ckpt_methods.py`` (torch.save,
safetensors, DCP save, DCP async_save with its default stager and with a reused
DefaultStager -- pinned only when CUDA is present --, trainguard blocking and not), saves
it ``--repeat`` times and restores each save cold into a zeroed model, checked with
``torch.equal``. Per save:

* stall   = time until the loop may mutate parameters again (see ``ckpt_methods``; the
  output lists what each method's stall timer waited on);
* durable = time from the call to the fsync / commit;
* restore = cold load (page cache dropped first) + ``load_state_dict`` / in-place restore.

Peak host RSS is measured per method in a fresh process (this script, ``--only METHOD``):
build the model, reset the peak (``/proc/self/clear_refs`` 5; else ``ru_maxrss``), save
once until durable; reported as (peak - RSS before the save) / state bytes.

Floors, same run: memcpy = ``dst.copy_(src)`` of every tensor into one preallocated,
pre-touched CPU buffer, best of 3, measured right before every save (memory bandwidth of a
shared VM drifts 3-4x within minutes) [+ pinned D2H copy of the same bytes with a GPU];
write = ``dd bs=64M oflag=direct``; read = cold ``dd bs=64M iflag=direct`` (per repeat).
Ratios, time over time for the same bytes (1.00x = at the floor): stall/memcpy = best over
repeats of (stall / the memcpy floor taken just before that save); durable / best write
floor; restore / best read floor. Times are best of ``--repeat``; the first repeat also
pays each method's one-off buffer allocation (printed). The JSON (``JSON: {...}``,
optionally ``--json``) has medians and every run.

Incremental: a model whose bytes are ~90% a frozen ``nn.Embedding`` plus trainable Linear
layers (plain SGD: no optimizer tensors) is saved with ``CheckpointManager(incremental=
True)`` once, stepped once, saved again; reported: bytes of the 2nd save / 1st. Should
trainguard fail on the one big table, the error is printed and the run is repeated with
the frozen bytes split into tables of <= 2**24 elements.

Run:  python bench/ckpt_bench.py --size-gb 1 [--repeat 3] [--dir /mnt/disk] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ckpt_methods import METHODS
from torch import nn

from trainguard import CheckpointManager

GB = 1e9
DD_BLOCK = 64 << 20


# -- state ------------------------------------------------------------------------------

def build_model(size_gb: float, d: int) -> nn.Sequential:
    """Random float32 Linear(d, d) stack with about ``size_gb`` GB of parameters."""
    layer_bytes = (d * d + d) * 4
    n_layers = max(1, round(size_gb * GB / layer_bytes))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(n_layers)])


def payload_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def zero(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()


def check_and_zero(model: nn.Module, target: nn.Module, what: str) -> None:
    """Fail unless target holds exactly model's tensors, then zero target again."""
    ref, got = model.state_dict(), target.state_dict()
    assert ref.keys() == got.keys(), f"{what}: loaded keys differ"
    for key, tensor in ref.items():
        assert torch.equal(tensor, got[key]), f"{what}: {key} differs after load"
    zero(target)


def drop_caches() -> bool:
    """Flush and drop the page cache; False when not permitted (warm cache)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# -- floors -----------------------------------------------------------------------------

def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class MemcpyFloor:
    """``dst.copy_(src)`` of every tensor into views of one preallocated, touched buffer.

    Called right before each save: on a shared VM memory bandwidth drifts by 3-4x within
    minutes, so each stall is compared with the floor measured next to it."""

    def __init__(self, model: nn.Module) -> None:
        tensors = list(model.state_dict().values())
        buf = torch.zeros(sum(t.numel() * t.element_size() for t in tensors), dtype=torch.uint8)
        self.pairs, offset = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            self.pairs.append((buf[offset:offset + n].view(t.dtype).view(t.shape), t))
            offset += n

    def copy_all(self) -> None:
        for dst, src in self.pairs:
            dst.copy_(src)

    def __call__(self) -> float:
        """Best of 3, seconds."""
        return best_of(3, self.copy_all)


def d2h_floor(nbytes: int) -> float | None:
    """Best of 3 device-to-pinned-host copy of ``nbytes``; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    copy()
    return best_of(3, copy)


def dd(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def disk_floor(nbytes: int, work: Path) -> dict:
    """dd write (O_DIRECT) and cold dd read (O_DIRECT) of about ``nbytes``."""
    count = max(1, round(nbytes / DD_BLOCK))
    path = work / "dd-floor.bin"
    os.sync()
    write_s = dd("if=/dev/zero", f"of={path}", "bs=64M", f"count={count}", "oflag=direct")
    cold = drop_caches()
    read_s = dd(f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct")
    path.unlink()
    return {"bytes": count * DD_BLOCK, "write_s": write_s, "read_s": read_s, "cold": cold}


# -- peak RSS (child process) -------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_rss(args: argparse.Namespace) -> None:
    """``--only METHOD``: one save until durable; print the peak extra RSS as JSON."""
    model = build_model(args.size_gb, args.d)
    nbytes = payload_bytes(model)
    exact = reset_peak_rss()
    before_kb = _status_kb("VmRSS") if exact else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = METHODS[args.only](Path(args.dir))
    method.save(model, 1)
    method.close()
    peak_kb = _status_kb("VmHWM") if exact else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = (peak_kb - before_kb) * 1024
    print("RSS: " + json.dumps({"extra_bytes": extra, "ratio": extra / nbytes,
                                "how": "VmHWM reset" if exact else "ru_maxrss"}))


def measure_rss(name: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"rss-{name.replace(' ', '_')}"
    cmd = [sys.executable, __file__, "--only", name, "--size-gb", str(args.size_gb),
           "--d", str(args.d), "--dir", str(out)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RSS: ")][-1]
    return json.loads(line[5:])


# -- timed runs ---------------------------------------------------------------------------

def run_once(method, model: nn.Module, target: nn.Module, step: int,
             memcpy: MemcpyFloor) -> dict:
    """memcpy floor, one save, cold verified restore; the save's files are then discarded."""
    memcpy_s = memcpy()
    os.sync()
    timing = method.save(model, step)
    cold = drop_caches()
    start = time.perf_counter()
    method.load(target, step)
    restore_s = time.perf_counter() - start
    check_and_zero(model, target, method.name)
    method.discard(step)
    return {"memcpy_s": memcpy_s, "stall_s": timing.stall_s, "durable_s": timing.durable_s,
            "restore_s": restore_s, "bytes": timing.bytes, "cold": cold, **timing.detail}


def run_all(model, target, args, work: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """Every repeat: the disk floors, then each method once (instances live across
    repeats, as a training loop's manager or stager would)."""
    methods = {name: cls(work / name.replace(" ", "_")) for name, cls in METHODS.items()}
    memcpy = MemcpyFloor(model)
    floors, runs = [], {name: [] for name in methods}
    try:
        for rep in range(args.repeat):
            floors.append(disk_floor(payload_bytes(model), work))
            for name, method in methods.items():
                r = run_once(method, model, target, rep + 1, memcpy)
                runs[name].append(r)
                print(f"rep {rep + 1}/{args.repeat} {name}: stall {r['stall_s']:.2f} s "
                      f"(memcpy {r['memcpy_s']:.2f} s), "
                      f"durable {r['durable_s']:.2f} s, restore {r['restore_s']:.2f} s",
                      flush=True)
    finally:
        for method in methods.values():
            method.close()
            shutil.rmtree(method.work, ignore_errors=True)
    return floors, runs


# -- incremental ----------------------------------------------------------------------------

class FrozenEmbeddingModel(nn.Module):
    """~90% of bytes in frozen embedding table(s), the rest in trainable Linear layers."""

    def __init__(self, size_gb: float, tables: int = 1, dim: int = 1024) -> None:
        super().__init__()
        torch.manual_seed(1)
        rows = max(1, round(0.9 * size_gb * GB / (dim * 4) / tables))
        layers = max(1, round(0.1 * size_gb * GB / ((dim * dim + dim) * 4)))
        self.tables = nn.ModuleList(nn.Embedding(rows, dim).requires_grad_(False)
                                    for _ in range(tables))
        self.body = nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = sum(table(idx) for table in self.tables)
        return self.body(x).square().mean()


def sgd_step(model: FrozenEmbeddingModel, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randint(0, model.tables[0].num_embeddings, (64,))).backward()
    opt.step()


def incremental_once(model: FrozenEmbeddingModel, run_dir: Path) -> dict:
    """Full save, one SGD step, incremental save: bytes written by each (verified)."""
    total = payload_bytes(model)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mgr = CheckpointManager(str(run_dir), incremental=True)
    try:
        sgd_step(model, opt)
        first = mgr.save(1, {"model": model}).wait().manifest.total_bytes
        sgd_step(model, opt)
        handle = mgr.save(2, {"model": model})
        second = handle.wait().manifest.total_bytes
        target = copy.deepcopy(model)
        zero(target)
        assert mgr.restore({"model": target}) == 2
        check_and_zero(model, target, "incremental restore")
    finally:
        mgr.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"state_bytes": total, "trainable_fraction": trainable / total,
            "tables": len(model.tables), "first_bytes": first, "second_bytes": second,
            "ratio": second / first, "second_stall_s": handle.stall_seconds,
            "second_durable_s": handle.seconds_to_durable}


def incremental(args: argparse.Namespace, work: Path) -> dict:
    """One big frozen nn.Embedding; if trainguard fails on it, say so and retry with the
    frozen bytes split into tables of <= 2**24 elements each."""
    try:
        return incremental_once(FrozenEmbeddingModel(args.size_gb), work / "incremental")
    except Exception as exc:  # noqa: BLE001 -- reported in the output, not hidden
        error = f"{type(exc).__name__}: {exc}"
    tables = max(1, -(-round(0.9 * args.size_gb * GB / 4) // (1 << 24)))
    result = incremental_once(FrozenEmbeddingModel(args.size_gb, tables), work / "incremental")
    return {**result, "one_table_error": error}


# -- report -----------------------------------------------------------------------------------

def summarize(runs: list[dict], key: str) -> dict:
    times = [r[key] for r in runs]
    return {"best_s": min(times), "median_s": statistics.median(times), "all_s": times}


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    model = build_model(args.size_gb, args.d)
    target = nn.Sequential(*[nn.utils.skip_init(nn.Linear, args.d, args.d) for _ in model])
    zero(target)  # the load target starts all zeros (and is zeroed after each check)
    nbytes = payload_bytes(model)
    d2h_s = d2h_floor(nbytes)
    floors, all_runs = run_all(model, target, args, work)
    methods = {name: {"stall": summarize(runs, "stall_s"),
                      "stall_over_memcpy": summarize(
                          [{"x": r["stall_s"] / r["memcpy_s"]} for r in runs], "x"),
                      "durable": summarize(runs, "durable_s"),
                      "restore": summarize(runs, "restore_s"), "bytes": runs[0]["bytes"],
                      "stall_waits_on": METHODS[name].stall_waits_on, "runs": runs}
               for name, runs in all_runs.items()}
    del model, target
    for name in METHODS:
        methods[name]["rss"] = measure_rss(name, args, work)
    cold = all(f["cold"] for f in floors) and all(
        r["cold"] for m in methods.values() for r in m["runs"])
    fb = floors[0]["bytes"]
    memcpy = summarize([r for m in methods.values() for r in m["runs"]], "memcpy_s")
    return {
        "size_bytes": nbytes, "d": args.d, "repeat": args.repeat, "dir": str(work),
        "cache": "cold" if cold else "warm cache", "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "floor": {"memcpy": memcpy, "d2h_pinned_s": d2h_s, "disk_bytes": fb,
                  "write": summarize(floors, "write_s"), "read": summarize(floors, "read_s")},
        "methods": methods, "incremental": incremental(args, work),
    }


HEADER = ["method", "stall s", "stall/memcpy", "durable s", "durable/disk floor",
          "restore s", "restore/read floor", "peak extra RSS / state"]
WIDTHS = [19] + [len(h) for h in HEADER[1:]]


def row(cells: list[str]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, WIDTHS)) + " |"


def cell(seconds: float | None, floor_s: float | None, ratio: float | None = None) -> list[str]:
    if seconds is None:
        return ["-", "-"]
    ratio = seconds / floor_s if ratio is None else ratio
    return [f"{seconds:.2f}", f"{ratio:.2f}x"]


def print_table(res: dict) -> None:
    fl, n = res["floor"], res["size_bytes"]
    write_s = fl["write"]["best_s"] * n / fl["disk_bytes"]  # scaled to the state's bytes
    read_s = fl["read"]["best_s"] * n / fl["disk_bytes"]
    print(row(HEADER))
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|")
    print(row(["memcpy floor", *cell(fl["memcpy"]["best_s"], fl["memcpy"]["best_s"]),
               "-", "-", "-", "-", "-"]))
    print(row(["dd write floor", "-", "-", *cell(write_s, write_s), "-", "-", "-"]))
    print(row(["dd read floor", "-", "-", "-", "-", *cell(read_s, read_s), "-"]))
    for name, m in res["methods"].items():
        print(row([name, *cell(m["stall"]["best_s"], None, m["stall_over_memcpy"]["best_s"]),
                   *cell(m["durable"]["best_s"], write_s),
                   *cell(m["restore"]["best_s"], read_s), f"{m['rss']['ratio']:.2f}x"]))


def print_report(res: dict, args: argparse.Namespace) -> None:
    fl, n, inc = res["floor"], res["size_bytes"], res["incremental"]
    print(f"\n{n / GB:.3f} GB float32 state (Linear({args.d}, {args.d}) stack), best of "
          f"{args.repeat}, {res['cache']} restores, {res['cpus']} CPUs, torch {res['torch']}, "
          f"dir {res['dir']} (removed)\n")
    print_table(res)
    d2h, mc = fl["d2h_pinned_s"], fl["memcpy"]
    print(f"\nfloors: memcpy {n / mc['best_s'] / GB:.2f} GB/s (measured before each save: "
          f"{min(mc['all_s']):.2f}-{max(mc['all_s']):.2f} s) | pinned D2H "
          + (f"{n / d2h / GB:.2f} GB/s" if d2h else "n/a (no GPU)")
          + f" | dd write {fl['disk_bytes'] / fl['write']['best_s'] / GB:.2f} GB/s"
          f" | dd read (cold) {fl['disk_bytes'] / fl['read']['best_s'] / GB:.2f} GB/s"
          " (disk ratios scale the floor to the state's bytes)")
    print("stall/memcpy = best over repeats of (stall / memcpy floor measured just before "
          "that save); rep-1 stall (first save, buffers fresh): " + ", ".join(
              f"{name} {m['stall']['all_s'][0]:.2f} s" for name, m in res["methods"].items()))
    print("stall waits on:")
    for name, m in res["methods"].items():
        print(f"  {name}: {m['stall_waits_on']}")
    print(f"incremental: {inc['state_bytes'] / GB:.2f} GB, "
          f"{1 - inc['trainable_fraction']:.0%} frozen; 2nd save wrote "
          f"{inc['second_bytes'] / GB:.3f} GB of the 1st's {inc['first_bytes'] / GB:.3f} GB "
          f"= {inc['ratio']:.3f} (target <= 0.15); stall {inc['second_stall_s']:.2f} s, "
          f"durable {inc['second_durable_s']:.2f} s"
          + (f" [{inc['tables']} frozen tables: ONE big table FAILED: "
             f"{inc['one_table_error']}]" if "one_table_error" in inc else ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="parameter GB (1e9 B)")
    parser.add_argument("--dir", default=None,
                        help="parent directory for the files (a temp dir is made inside "
                             "it and removed afterwards); default /tmp")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (best shown)")
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    parser.add_argument("--d", type=int, default=4096, help="Linear width (default 4096)")
    parser.add_argument("--only", default=None, choices=list(METHODS), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.only:
        child_rss(args)
        return
    work = Path(tempfile.mkdtemp(prefix="ckpt_bench-", dir=args.dir or "/tmp"))
    try:
        result = benchmark(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(result, args)
    doc = json.dumps(result, separators=(",", ":"))
    print("JSON: " + doc)
    if args.json:
        Path(args.json).write_text(doc + "\n")


if __name__ == "__main__":
    main()
