"""Checkpoint benchmark: stall, time-to-durable, restore and peak RSS against the floors.

The state is a stack of ``nn.Linear(d, d)`` layers (``--size-gb`` GB in all) on
``--device`` (cpu or cuda), with ``--adamw`` its AdamW moments too (then parameters are a
third of the bytes): ``--device cuda --adamw --size-gb 19.33`` is 96 x Linear(4096, 4096)
+ AdamW. Each method of ``ckpt_methods.py`` (torch.save, safetensors, DCP save, DCP
async_save with its default stager and with a reused DefaultStager -- pinned with CUDA --,
trainguard blocking and not) runs ``--repeat`` times; each time it saves in one fresh
process and restores in another, so no method inherits another's caches, allocator pools
or page cache, and a restore finds nothing its save left in memory (a resumed run).

Save process:

1. build the state (seeded); copy floor once (allocates and touches its buffer), reset
   the peak RSS;
2. methods that keep buffers across saves (trainguard, the reused stager) save once to
   warm up (its stall is reported as the first save's), as a training loop would;
3. dd write floor, copy floor, **the timed save** (stall and time-to-durable), copy
   floor, dd write floor (its file stays for the restore's read floor);
4. peak extra host RSS = (VmHWM after the save - VmRSS at 1) / state bytes, so reused
   buffers (host arena, stager cache) count.

Restore process: build the expected state and a zeroed target of the same shapes; dd
read floor, page cache dropped, **the timed restore** into the target, dd read floor;
then checked with ``torch.equal``.

* stall   = until the loop may mutate parameters again (``ckpt_methods`` lists what each
  method's timer waits on);
* durable = from the call to the fsync / commit;
* restore = cold load + copy into the live tensors (baselines) / in-place restore.

Every ratio is the time over the mean of its two brackets, the floor measured on the
same bytes right before and right after it (``floors.py``: dd O_DIRECT write + fsync of
a fresh file, cold dd O_DIRECT read, memcpy / pinned D2H); a run whose brackets differ by
more than 1.5x is marked NOISY. The table shows the median over the repeats and the
[min-max] of the ratios.

Incremental: a model whose bytes are ~90% a frozen ``nn.Embedding`` plus trainable Linear
layers (plain SGD), ``--inc-size-gb`` GB on ``--device``, is saved with
``CheckpointManager(incremental=True)`` once, stepped once, saved again; reported: bytes
of the 2nd save / 1st, and its time-to-durable against the dd write floor of the whole
state (bracketed the same way): under 1.00x is faster than writing the state at all.

Run:  python bench/ckpt_bench.py --size-gb 1 [--repeat 3] [--dir /mnt/disk] [--json out.json]
      python bench/ckpt_bench.py --device cuda --adamw --size-gb 19.33 --inc-size-gb 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ckpt_methods import METHODS, BenchState
from floors import NOISY, Bracket, CopyFloor, DiskFloor, drop_caches, spread_of
from torch import nn

from trainguard import CheckpointManager

GB = 1e9


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


def save_child(args: argparse.Namespace) -> dict:
    """``--only METHOD --phase save``: steps 1-5 of the module docstring."""
    state = build_state(args, seed=0)
    nbytes = state_bytes(state)
    floor = CopyFloor(list(state.flat.values()))
    floor()
    disk = DiskFloor(Path(args.dir), nbytes)
    exact = reset_peak_rss()
    before_kb = _status_kb("VmRSS")
    method = METHODS[args.only](Path(args.dir))
    first = None
    try:
        if method.reuses_buffers:
            first = method.save(state, 1)
            method.discard(1)
        write_before = disk.write()
        copy_before = floor()
        timing = method.save(state, 2)
        peak_kb = _status_kb("VmHWM")
        copy_after = floor()
        write_after = disk.write()  # the file stays: the restore's read floor reads it
    finally:
        method.close()
    extra = (peak_kb - before_kb) * 1024
    return {"state_bytes": nbytes, "floor_name": floor.name,
            "stall": Bracket(timing.stall_s, copy_before, copy_after).to_json(),
            "durable": Bracket(timing.durable_s, write_before, write_after).to_json(),
            "bytes": timing.bytes,
            "first_stall_s": None if first is None else first.stall_s,
            "first_durable_s": None if first is None else first.durable_s,
            "rss_extra_bytes": extra, "rss_ratio": extra / nbytes,
            "rss_how": "VmHWM reset" if exact else "VmHWM (not reset: includes the build)",
            **timing.detail}


def restore_child(args: argparse.Namespace) -> dict:
    """``--only METHOD --phase restore``: step 6, in a process that did not save."""
    state = build_state(args, seed=0)
    target = build_state(args, seed=0)
    zero(target)
    disk = DiskFloor(Path(args.dir), state_bytes(state))
    method = METHODS[args.only](Path(args.dir))
    try:
        read_before = disk.read()
        cold = drop_caches([Path(args.dir)])
        start = time.perf_counter()
        method.load(target, 2)
        if args.device == "cuda":
            torch.cuda.synchronize()
        restore_s = time.perf_counter() - start
        read_after = disk.read()
        check_and_zero(state, target, method.name)
        method.discard(2)
    finally:
        method.close()
        disk.remove()
    return {"restore": Bracket(restore_s, read_before, read_after).to_json(), "cold": cold}


def run_child(what: str, args: argparse.Namespace, out: Path, phase: str) -> dict:
    """One fresh process: ``phase`` ("save" or "restore") of method ``what``."""
    cmd = [sys.executable, __file__, "--only", what, "--phase", phase, "--dir", str(out),
           *[a for k, v in vars(args).items() if k in PASSED for a in _flag(k, v)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT: ")]
    if proc.returncode or not lines:
        return {"error": f"{phase}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1],
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
    disk = DiskFloor(Path(args.dir), total)
    try:
        sgd_step(model, opt)
        first = mgr.save(1, {"model": model}).wait().manifest.total_bytes
        sgd_step(model, opt)
        before = disk.write()
        handle = mgr.save(2, {"model": model})
        second = handle.wait().manifest.total_bytes
        after = disk.write()
        disk.remove()
        target = FrozenEmbeddingModel(args.inc_size_gb, args.device)
        assert mgr.restore({"model": target}) == 2
        for key, value in model.state_dict().items():
            assert torch.equal(value, target.state_dict()[key]), f"incremental: {key}"
    finally:
        mgr.close()
    return {"state_bytes": total, "trainable_fraction": trainable / total,
            "first_bytes": first, "second_bytes": second, "ratio": second / first,
            "second_stall_s": handle.stall_seconds,
            "second_durable_s": handle.seconds_to_durable,
            "durable": Bracket(handle.seconds_to_durable, before, after).to_json()}


# -- parent -----------------------------------------------------------------------------------

def run_method(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Save in one fresh process, restore in another; the checkpoint is removed after."""
    out = work / name.replace(" ", "_").replace("+", "_")
    try:
        result = run_child(name, args, out, "save")
        if "error" not in result:
            result.update(run_child(name, args, out, "restore"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result


def benchmark(args: argparse.Namespace, work: Path, names: list[str]) -> dict:
    nbytes = n_layers(args) * layer_bytes(args.d, args.adamw)
    res: dict = {"size_bytes": nbytes, "layers": n_layers(args), "d": args.d,
                 "device": args.device, "adamw": args.adamw, "repeat": args.repeat,
                 "dir": str(work), "torch": torch.__version__, "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                 "noisy_factor": NOISY, "methods": {}}
    if args.inc_size_gb > 0:  # first: cheap, and not lost if a long run is cut short
        res["incremental"] = run_child("incremental", args, work / "incremental", "save")
        shutil.rmtree(work / "incremental", ignore_errors=True)
    for rep in range(args.repeat):
        for name in names:
            r = run_method(name, args, work)
            res["methods"].setdefault(name, []).append(r)
            print(f"rep {rep + 1}/{args.repeat} {name}: {describe(r)}", flush=True)
            if args.json:  # partial results survive a run cut short
                Path(args.json).write_text(json.dumps(res) + "\n")
    return res


def _bracket(b: dict, floor: str) -> str:
    mark = " NOISY" if b["noisy"] else ""
    return (f"{b['seconds']:.2f} s ({floor} {b['before_s']:.2f} | {b['after_s']:.2f} s: "
            f"{b['ratio']:.2f}x{mark})")


def describe(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    return (f"stall {_bracket(r['stall'], r['floor_name'])}, durable "
            f"{_bracket(r['durable'], 'dd write')}, restore {_bracket(r['restore'], 'dd read')}"
            f", extra RSS {r['rss_ratio']:.2f}x")


HEADER = ["method", "stall s", "stall/copy", "durable s", "durable/dd write", "restore s",
          "restore/dd read", "noisy w/r", "peak RSS"]
WIDTHS = [19, 7, 20, 9, 20, 9, 20, 9, 8]


def row(cells: list[str]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, WIDTHS, strict=True)) + " |"


def _cells(runs: list[dict], key: str) -> list[str]:
    """Median seconds, and the ratio's median [min-max] over the repeats."""
    sec = spread_of([r[key]["seconds"] for r in runs])
    ratio = spread_of([r[key]["ratio"] for r in runs])
    span = f" [{ratio['min']:.2f}-{ratio['max']:.2f}]" if len(runs) > 1 else ""
    return [f"{sec['median']:.2f}", f"{ratio['median']:.2f}x{span}"]


def _floor_line(runs: list[dict], key: str, name: str) -> str:
    floors = [v for r in runs for v in (r[key]["before_s"], r[key]["after_s"])]
    s = spread_of(floors)
    return f"{name} {s['median']:.2f} s median ({s['min']:.2f}-{s['max']:.2f})"


def print_report(res: dict) -> None:
    n = res["size_bytes"]
    ok_runs = [r for runs in res["methods"].values() for r in runs if "error" not in r]
    cold = sorted({r["cold"] for r in ok_runs}) or ["-"]
    opt = " + AdamW" if res["adamw"] else ""
    print(f"\n{n / GB:.2f} GB state ({res['layers']} x Linear({res['d']}, {res['d']}){opt}, "
          f"float32) on {res['device']}{' (' + res['gpu'] + ')' if res['gpu'] else ''}, "
          f"{res['repeat']} repeats (median [min-max] of the ratios), save and restore each "
          f"in a fresh process, every one bracketed by its floor right before and after "
          f"(ratio against their mean; NOISY: brackets differ by >{res['noisy_factor']}x), "
          f"cold restores ({', '.join(cold)}), {res['cpus']} CPUs, torch {res['torch']}\n")
    print(row(HEADER))
    print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|")
    for name, runs in res["methods"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(row([name, "FAILED"] + ["-"] * 7) + f"  {runs[0]['error']}")
            continue
        noisy = (f"{sum(r['durable']['noisy'] for r in ok)}/{len(ok)} "
                 f"{sum(r['restore']['noisy'] for r in ok)}/{len(ok)}")
        print(row([name, *_cells(ok, "stall"), *_cells(ok, "durable"),
                   *_cells(ok, "restore"), noisy, f"{max(r['rss_ratio'] for r in ok):.2f}x"]))
    if ok_runs:
        print(f"\nbrackets over all runs: {_floor_line(ok_runs, 'stall', ok_runs[0]['floor_name'])}"
              f" | {_floor_line(ok_runs, 'durable', 'dd write (O_DIRECT, fsync)')}"
              f" | {_floor_line(ok_runs, 'restore', 'dd read (O_DIRECT, cold)')}")
    firsts = [f"{name} {runs[0]['first_stall_s']:.2f} s" for name, runs in res["methods"].items()
              if runs and runs[0].get("first_stall_s") is not None]
    if firsts:
        print("first save of a process (buffers allocated; not in the table): " + ", ".join(firsts))
    print("stall waits on:")
    for name in res["methods"]:
        print(f"  {name}: {METHODS[name].stall_waits_on}")
    print_incremental(res)


def print_incremental(res: dict) -> None:
    inc = res.get("incremental")
    if inc and "error" in inc:
        print(f"incremental: FAILED: {inc['error']}")
    elif inc:
        d = inc["durable"]
        print(f"incremental ({res['device']}): {inc['state_bytes'] / GB:.2f} GB, "
              f"{1 - inc['trainable_fraction']:.0%} frozen; 2nd save wrote "
              f"{inc['second_bytes'] / GB:.3f} GB of the 1st's {inc['first_bytes'] / GB:.3f} GB "
              f"= {inc['ratio']:.3f} (target <= 0.15); stall {inc['second_stall_s']:.2f} s, "
              f"durable {_bracket(d, 'dd write of the whole state')}")

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="state GB (1e9 B): parameters, plus AdamW moments with --adamw")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--adamw", action="store_true", help="checkpoint AdamW moments too")
    parser.add_argument("--dir", default=None,
                        help="parent directory for the files (a temp dir is made inside "
                             "it and removed afterwards); default /tmp")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per method (median and spread shown)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        metavar="METHOD", help=f"subset of: {', '.join(METHODS)}")
    parser.add_argument("--inc-size-gb", type=float, default=1.0,
                        help="incremental check's model GB (0: skip)")
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    parser.add_argument("--d", type=int, default=4096, help="Linear width (default 4096)")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="only print the tables of an earlier --json document")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="save", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        print_report(json.loads(Path(args.report).read_text()))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    if args.only:
        if args.only == "incremental":
            result = incremental(args)
        else:
            result = save_child(args) if args.phase == "save" else restore_child(args)
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
