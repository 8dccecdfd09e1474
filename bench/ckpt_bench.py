"""Checkpoint benchmark: stall, time-to-durable, restore and peak RSS against the floors.

The state is a stack of ``nn.Linear(d, d)`` layers (``--size-gb`` GB in all) on
``--device`` (cpu or cuda), with ``--adamw`` its AdamW moments too (then parameters are a
third of the bytes): ``--device cuda --adamw --size-gb 19.33`` is 96 x Linear(4096, 4096)
+ AdamW. Each method of ``ckpt_methods.py`` (torch.save, safetensors, DCP save, DCP
async_save with its default stager and with a reused DefaultStager -- pinned with CUDA --,
trainguard blocking and not) runs ``--repeat`` times, each time in a fresh process, so no
method inherits another's caches, allocator pools or page cache. In that process:

1. build the state and a zeroed target of the same shapes (same seed: same values);
2. copy floor once (allocates and touches its buffer), reset the peak RSS;
3. methods that keep buffers across saves (trainguard, the reused stager) save once to
   warm up (its stall is reported as the first save's), as a training loop would;
4. copy floor again, right before the timed save (memory bandwidth of a shared VM drifts
   3-4x within minutes), then one save: stall and time-to-durable;
5. peak extra host RSS = (VmHWM after the save - VmRSS at 2) / state bytes, so reused
   buffers (host arena, stager cache) count;
6. page cache dropped, cold restore into the target, checked with ``torch.equal``.

* stall   = until the loop may mutate parameters again (``ckpt_methods`` lists what each
  method's timer waits on);
* durable = from the call to the fsync / commit;
* restore = cold load + copy into the live tensors (baselines) / in-place restore.

Floors: copy = every tensor into one preallocated buffer (pinned, non_blocking +
synchronize, when the state is on CUDA: the pinned D2H floor; else memcpy), best of 3;
disk = ``dd bs=64M oflag=direct`` write and cold ``dd bs=64M iflag=direct`` read of the
state's bytes, once per repeat, in the parent. Ratios are time over time for the same
bytes (1.00x = at the floor): stall / the copy floor taken in the same process just
before it; durable / best write floor; restore / best read floor.

Incremental: a model whose bytes are ~90% a frozen ``nn.Embedding`` plus trainable Linear
layers (plain SGD), ``--inc-size-gb`` GB on ``--device``, is saved with
``CheckpointManager(incremental=True)`` once, stepped once, saved again; reported: bytes
of the 2nd save / 1st.

Run:  python bench/ckpt_bench.py --size-gb 1 [--repeat 3] [--dir /mnt/disk] [--json out.json]
      python bench/ckpt_bench.py --device cuda --adamw --size-gb 19.33 --inc-size-gb 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ckpt_methods import METHODS, BenchState
from torch import nn

from trainguard import CheckpointManager

GB = 1e9
DD_BLOCK = 64 << 20


# -- state ------------------------------------------------------------------------------

def layer_bytes(d: int, adamw: bool) -> int:
    return (d * d + d) * 4 * (3 if adamw else 1)


def n_layers(args: argparse.Namespace) -> int:
    return max(1, round(args.size_gb * GB / layer_bytes(args.d, args.adamw)))


def build_state(args: argparse.Namespace, seed: int) -> BenchState:
    """The Linear stack on ``args.device`` (and its AdamW after one step), seeded."""
    torch.manual_seed(seed)
    device = torch.device(args.device)
    model = nn.Sequential(*[nn.Linear(args.d, args.d, device=device)
                            for _ in range(n_layers(args))])
    tree: dict = {"model": model}
    if args.adamw:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():  # one step with random grads fills both moments
            p.grad = torch.randn_like(p)
        opt.step()
        for p in model.parameters():
            p.grad = None
        tree["optim"] = opt
    return BenchState(live_flat(BenchState({}, tree)), tree)


def state_bytes(state: BenchState) -> int:
    return sum(t.numel() * t.element_size() for t in state.flat.values())


def zero(state: BenchState) -> None:
    with torch.no_grad():
        for tensor in state.flat.values():
            tensor.zero_()


def check_and_zero(state: BenchState, target: BenchState, what: str) -> None:
    """Fail unless target holds exactly state's tensors, then zero target again.

    Read through the target's live objects (an optimizer's ``load_state_dict`` replaces
    its state tensors, so ``target.flat`` may hold the old ones)."""
    live = live_flat(target)
    assert state.flat.keys() == live.keys(), f"{what}: loaded keys differ"
    for key, tensor in state.flat.items():
        assert torch.equal(tensor, live[key]), f"{what}: {key} differs after load"
    target.flat.update(live)
    zero(target)


def live_flat(state: BenchState) -> dict[str, torch.Tensor]:
    model = state.tree["model"]
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = state.tree.get("optim")
    if opt is not None:
        for i, p in enumerate(model.parameters()):
            flat.update({f"optim.{i}.{k}": v for k, v in opt.state[p].items()
                         if isinstance(v, torch.Tensor)})
    return flat


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


class CopyFloor:
    """Every tensor copied into views of one preallocated, touched host buffer: pinned
    with non_blocking copies and one synchronize when any tensor is on CUDA (the pinned
    device-to-host floor), a plain memcpy otherwise."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.cuda = any(t.device.type == "cuda" for t in tensors)
        total = sum(t.numel() * t.element_size() for t in tensors)
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=self.cuda)
        buf.fill_(0)
        self.pairs, offset = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            self.pairs.append((buf[offset:offset + n].view(t.dtype).view(t.shape), t))
            offset += n
        self.name = "pinned D2H" if self.cuda else "memcpy"

    def copy_all(self) -> None:
        for dst, src in self.pairs:
            dst.copy_(src, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self) -> float:
        """Best of 3, seconds."""
        return best_of(3, self.copy_all)


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


# -- one method, one fresh process --------------------------------------------------------

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


def child(args: argparse.Namespace) -> dict:
    """``--only METHOD``: the steps in the module docstring, in this process."""
    state = build_state(args, seed=0)
    target = build_state(args, seed=0)
    zero(target)
    nbytes = state_bytes(state)
    floor = CopyFloor(list(state.flat.values()))
    floor()
    exact = reset_peak_rss()
    before_kb = _status_kb("VmRSS")
    method = METHODS[args.only](Path(args.dir))
    first = None
    try:
        if method.reuses_buffers:
            first = method.save(state, 1)
            method.discard(1)
        floor_s = floor()
        timing = method.save(state, 2)
        peak_kb = _status_kb("VmHWM")
        cold = drop_caches()
        start = time.perf_counter()
        method.load(target, 2)
        if args.device == "cuda":
            torch.cuda.synchronize()
        restore_s = time.perf_counter() - start
        check_and_zero(state, target, method.name)
        method.discard(2)
    finally:
        method.close()
    extra = (peak_kb - before_kb) * 1024
    return {"state_bytes": nbytes, "floor_name": floor.name, "floor_s": floor_s,
            "stall_s": timing.stall_s, "durable_s": timing.durable_s, "restore_s": restore_s,
            "bytes": timing.bytes, "cold": cold,
            "first_stall_s": None if first is None else first.stall_s,
            "first_durable_s": None if first is None else first.durable_s,
            "rss_extra_bytes": extra, "rss_ratio": extra / nbytes,
            "rss_how": "VmHWM reset" if exact else "VmHWM (not reset: includes the build)",
            **timing.detail}


def run_child(what: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / what.replace(" ", "_").replace("+", "_")
    cmd = [sys.executable, __file__, "--only", what, "--dir", str(out),
           *[a for k, v in vars(args).items() if k in PASSED for a in _flag(k, v)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT: ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1],
                "returncode": proc.returncode}
    return json.loads(lines[-1][len("RESULT: "):])


PASSED = ("size_gb", "d", "device", "adamw", "inc_size_gb")


def _flag(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    return [flag, str(value)]


# -- incremental ----------------------------------------------------------------------------

class FrozenEmbeddingModel(nn.Module):
    """~90% of bytes in a frozen embedding table, the rest in trainable Linear layers."""

    def __init__(self, size_gb: float, device: str, dim: int = 1024) -> None:
        super().__init__()
        torch.manual_seed(1)
        rows = max(1, round(0.9 * size_gb * GB / (dim * 4)))
        layers = max(1, round(0.1 * size_gb * GB / ((dim * dim + dim) * 4)))
        self.table = nn.Embedding(rows, dim, device=device).requires_grad_(False)
        self.body = nn.Sequential(*[nn.Linear(dim, dim, device=device) for _ in range(layers)])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.body(self.table(idx)).square().mean()


def sgd_step(model: FrozenEmbeddingModel, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    idx = torch.randint(0, model.table.num_embeddings, (64,), device=model.table.weight.device)
    model(idx).backward()
    opt.step()


def incremental(args: argparse.Namespace) -> dict:
    """``--only incremental``: full save, one SGD step, incremental save, verified."""
    model = FrozenEmbeddingModel(args.inc_size_gb, args.device)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mgr = CheckpointManager(args.dir, incremental=True)
    try:
        sgd_step(model, opt)
        first = mgr.save(1, {"model": model}).wait().manifest.total_bytes
        sgd_step(model, opt)
        handle = mgr.save(2, {"model": model})
        second = handle.wait().manifest.total_bytes
        target = FrozenEmbeddingModel(args.inc_size_gb, args.device)
        assert mgr.restore({"model": target}) == 2
        for key, value in model.state_dict().items():
            assert torch.equal(value, target.state_dict()[key]), f"incremental: {key}"
    finally:
        mgr.close()
    return {"state_bytes": total, "trainable_fraction": trainable / total,
            "first_bytes": first, "second_bytes": second, "ratio": second / first,
            "second_stall_s": handle.stall_seconds,
            "second_durable_s": handle.seconds_to_durable}


# -- parent -----------------------------------------------------------------------------------

def summarize(runs: list[dict], key: str) -> dict:
    times = [r[key] for r in runs]
    return {"best_s": min(times), "median_s": statistics.median(times), "all_s": times}


def benchmark(args: argparse.Namespace, work: Path, names: list[str]) -> dict:
    nbytes = n_layers(args) * layer_bytes(args.d, args.adamw)
    res: dict = {"size_bytes": nbytes, "layers": n_layers(args), "d": args.d,
                 "device": args.device, "adamw": args.adamw, "repeat": args.repeat,
                 "dir": str(work), "torch": torch.__version__, "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                 "floors": [], "methods": {}}
    if args.inc_size_gb > 0:  # first: cheap, and not lost if a long run is cut short
        res["incremental"] = run_child("incremental", args, work)
    for rep in range(args.repeat):
        res["floors"].append(disk_floor(nbytes, work))
        f = res["floors"][-1]
        print(f"rep {rep + 1}/{args.repeat} dd: write {f['write_s']:.2f} s, "
              f"read {f['read_s']:.2f} s", flush=True)
        for name in names:
            r = run_child(name, args, work)
            res["methods"].setdefault(name, []).append(r)
            if "error" in r:
                print(f"rep {rep + 1}/{args.repeat} {name}: FAILED: {r['error']}", flush=True)
            else:
                print(f"rep {rep + 1}/{args.repeat} {name}: stall {r['stall_s']:.2f} s "
                      f"({r['floor_name']} {r['floor_s']:.2f} s), durable "
                      f"{r['durable_s']:.2f} s, restore {r['restore_s']:.2f} s, "
                      f"extra RSS {r['rss_ratio']:.2f}x", flush=True)
            if args.json:  # partial results survive a run cut short
                Path(args.json).write_text(json.dumps(res) + "\n")
    return res


HEADER = ["method", "stall s", "stall/copy floor", "durable s", "durable/disk floor",
          "restore s", "restore/read floor", "peak extra RSS / state"]
WIDTHS = [19] + [len(h) for h in HEADER[1:]]


def row(cells: list[str]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, WIDTHS)) + " |"


def print_report(res: dict) -> None:
    n = res["size_bytes"]
    floors = res["floors"]
    scale = n / floors[0]["bytes"]
    write_s = min(f["write_s"] for f in floors) * scale
    read_s = min(f["read_s"] for f in floors) * scale
    cold = all(f["cold"] for f in floors)
    opt = " + AdamW" if res["adamw"] else ""
    print(f"\n{n / GB:.2f} GB state ({res['layers']} x Linear({res['d']}, {res['d']}){opt}, "
          f"float32) on {res['device']}{' (' + res['gpu'] + ')' if res['gpu'] else ''}, "
          f"best of {res['repeat']}, fresh process per save, "
          f"{'cold' if cold else 'WARM-cache'} restores, {res['cpus']} CPUs, "
          f"torch {res['torch']}\n")
    print(row(HEADER))
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|")
    print(row(["dd write floor", "-", "-", f"{write_s:.2f}", "1.00x", "-", "-", "-"]))
    print(row(["dd read floor", "-", "-", "-", "-", f"{read_s:.2f}", "1.00x", "-"]))
    copy_floors = []
    for name, runs in res["methods"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(row([name, "FAILED"] + ["-"] * 6) + f"  {runs[0]['error']}")
            continue
        copy_floors += [r["floor_s"] for r in ok]
        stall = min(ok, key=lambda r: r["stall_s"] / r["floor_s"])
        durable = min(r["durable_s"] for r in ok)
        restore = min(r["restore_s"] for r in ok)
        print(row([name, f"{stall['stall_s']:.2f}", f"{stall['stall_s'] / stall['floor_s']:.2f}x",
                   f"{durable:.2f}", f"{durable / write_s:.2f}x", f"{restore:.2f}",
                   f"{restore / read_s:.2f}x", f"{max(r['rss_ratio'] for r in ok):.2f}x"]))
    if copy_floors:
        name = next(r for rs in res["methods"].values() for r in rs if "error" not in r)
        print(f"\nfloors: {name['floor_name']} {min(copy_floors):.2f}-{max(copy_floors):.2f} s "
              f"({n / min(copy_floors) / GB:.1f} GB/s best; measured in each process right "
              f"before its save) | dd write {floors[0]['bytes'] / min(f['write_s'] for f in floors) / GB:.2f} GB/s "
              f"| dd read {floors[0]['bytes'] / min(f['read_s'] for f in floors) / GB:.2f} GB/s")
    firsts = [f"{name} {runs[0]['first_stall_s']:.2f} s" for name, runs in res["methods"].items()
              if runs and runs[0].get("first_stall_s") is not None]
    if firsts:
        print("first save of a process (buffers allocated; not in the table): " + ", ".join(firsts))
    print("stall waits on:")
    for name in res["methods"]:
        print(f"  {name}: {METHODS[name].stall_waits_on}")
    inc = res.get("incremental")
    if inc and "error" in inc:
        print(f"incremental: FAILED: {inc['error']}")
    elif inc:
        print(f"incremental ({res['device']}): {inc['state_bytes'] / GB:.2f} GB, "
              f"{1 - inc['trainable_fraction']:.0%} frozen; 2nd save wrote "
              f"{inc['second_bytes'] / GB:.3f} GB of the 1st's {inc['first_bytes'] / GB:.3f} GB "
              f"= {inc['ratio']:.3f} (target <= 0.15); stall {inc['second_stall_s']:.2f} s, "
              f"durable {inc['second_durable_s']:.2f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="state GB (1e9 B): parameters, plus AdamW moments with --adamw")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--adamw", action="store_true", help="checkpoint AdamW moments too")
    parser.add_argument("--dir", default=None,
                        help="parent directory for the files (a temp dir is made inside "
                             "it and removed afterwards); default /tmp")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (best shown)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        metavar="METHOD", help=f"subset of: {', '.join(METHODS)}")
    parser.add_argument("--inc-size-gb", type=float, default=1.0,
                        help="incremental check's model GB (0: skip)")
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    parser.add_argument("--d", type=int, default=4096, help="Linear width (default 4096)")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="only print the tables of an earlier --json document")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        print_report(json.loads(Path(args.report).read_text()))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    if args.only:
        result = incremental(args) if args.only == "incremental" else child(args)
        print("RESULT: " + json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="ckpt_bench-", dir=args.dir or "/tmp"))
    try:
        result = benchmark(args, work, args.methods or list(METHODS))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(result)
    doc = json.dumps(result, separators=(",", ":"))
    print("JSON: " + doc)
    if args.json:
        Path(args.json).write_text(doc + "\n")


if __name__ == "__main__":
    main()
