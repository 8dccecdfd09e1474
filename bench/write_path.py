"""What each piece of trainguard's local write path costs, on the same bytes.

A save's time-to-durable on a local disk is: copy each tensor's bytes into the host
arena (the snapshot, not timed here), then per shard file: checksum (xxh3-128), copy
into page-aligned staging buffers (unless written straight from the arena), the
O_DIRECT writes, one fsync, the rename and the directory's fsync. This times each piece
alone on ``--size-gb`` GB of float32 values held in one page-aligned buffer (as the
arena holds them), in ``--rounds`` rounds of every variant, each O_DIRECT variant
bracketed by the dd floor (``floors.DiskFloor``: same bytes, same file system, right
before and after). The writes vary the request size and how many are in flight, to see
what the disk wants:

* ``direct CHUNK xDEPTH``: the file written with O_DIRECT ``pwrite`` s of CHUNK MiB,
  DEPTH of them in flight (threads), then fsync, then rename + directory fsync;
* ``LocalStore.write``: the store's own path (as the save's job calls it, checksum on
  the fly through ``HashedChunks``), whatever it does in this version.

Run:  python bench/write_path.py --size-gb 1 --rounds 3 [--dir /mnt/disk] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash
from floors import Bracket, DiskFloor

from trainguard.checkpoint.format import HashedChunks
from trainguard.store.local import LocalStore, fsync_dir

GB = 1e9
MIB = 1 << 20


def aligned_buffer(nbytes: int, huge: bool = False) -> memoryview:
    """``nbytes`` of trained-looking float32 values in a page-aligned private mapping,
    on transparent huge pages if ``huge`` (and the kernel grants them)."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        region.madvise(mmap.MADV_HUGEPAGE)
    values = torch.frombuffer(region, dtype=torch.float32)
    torch.manual_seed(0)
    values.normal_(0, 0.02)
    return memoryview(region)


def _disk_stat() -> tuple[int, int]:
    """(write requests, sectors written) of the disk under /tmp, from /sys/block."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] in ("vda", "sda", "nvme0n1", "xvda"):
            return int(f[7]), int(f[9])
    return 0, 0


def copy_into_staging(view: memoryview, chunk: int) -> float:
    """The staging copy: every byte into reused page-aligned buffers of ``chunk``."""
    staging = [mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
               for _ in range(2)]
    for buf in staging:  # touched first: the store's pool is reused across writes
        buf[:] = bytes(chunk)
    start = time.perf_counter()
    for i, offset in enumerate(range(0, len(view), chunk)):
        piece = view[offset:offset + chunk]
        staging[i % 2][:len(piece)] = piece
    return time.perf_counter() - start


def checksum(view: memoryview, chunk: int) -> float:
    start = time.perf_counter()
    hasher = xxhash.xxh3_128()
    for offset in range(0, len(view), chunk):
        hasher.update(view[offset:offset + chunk])
    hasher.hexdigest()
    return time.perf_counter() - start


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def direct_write(work: Path, view: memoryview, chunk: int, depth: int,
                 pool: ThreadPoolExecutor, staging: list | None = None) -> dict:
    """One file written with O_DIRECT: seconds of the writes, the fsync, the rename.

    With ``staging`` (page-aligned buffers of ``chunk``), each piece is first copied into
    the next staging buffer, as the store does for bytes that are not page-aligned."""
    tmp, final = work / ".tgtmp-direct", work / "direct.bin"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    requests = _disk_stat()
    try:
        start = time.perf_counter()
        offsets = list(range(0, len(view), chunk))
        futures = []
        for i, offset in enumerate(offsets):
            piece = view[offset:offset + chunk]
            if staging is not None:
                if len(futures) >= depth:  # the staging buffer is free again
                    futures.pop(0).result()
                buf = staging[i % len(staging)]
                buf[:len(piece)] = piece
                piece = memoryview(buf)[:len(piece)]
            if depth == 1:
                _pwrite_all(fd, piece, offset)
            else:
                futures.append(pool.submit(_pwrite_all, fd, piece, offset))
                if staging is None and len(futures) > depth:
                    futures.pop(0).result()
        for future in futures:
            future.result()
        written = time.perf_counter()
        os.fsync(fd)
        synced = time.perf_counter()
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(work)
    renamed = time.perf_counter()
    after = _disk_stat()
    final.unlink()
    count, sectors = after[0] - requests[0], after[1] - requests[1]
    return {"write_s": written - start, "fsync_s": synced - written,
            "rename_s": renamed - synced, "seconds": renamed - start,
            "request_kib": sectors * 512 / max(1, count) / 1024}


def store_write(work: Path, view: memoryview) -> dict:
    """``LocalStore.write`` of the buffer as the save job calls it (checksum on the fly)."""
    store = LocalStore(work / "store")
    requests = _disk_stat()
    start = time.perf_counter()
    chunks = HashedChunks(lambda: [view])
    store.write("shard.safetensors", chunks)
    chunks.entry()
    seconds = time.perf_counter() - start
    after = _disk_stat()
    shutil.rmtree(work / "store")
    count, sectors = after[0] - requests[0], after[1] - requests[1]
    return {"seconds": seconds, "request_kib": sectors * 512 / max(1, count) / 1024}


def staging_buffers(count: int, chunk: int, huge: bool) -> list[mmap.mmap]:
    out = []
    for _ in range(count):
        buf = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            buf.madvise(mmap.MADV_HUGEPAGE)
        buf[:] = bytes(chunk)  # faulted once: the store's pool is reused across writes
        out.append(buf)
    return out


def variants(nbytes: int) -> dict:
    """name -> (source buffer, write size, depth, staging buffers or None)."""
    small, huge = aligned_buffer(nbytes), aligned_buffer(nbytes, huge=True)
    out = {}
    for label, source in (("4 KiB pages", small), ("huge pages", huge)):
        for mib, depth in ((32, 1), (64, 1), (64, 2), (256, 1)):
            out[f"from {label}, {mib} MiB x{depth}"] = (source, mib * MIB, depth, None)
    for label, is_huge in (("4 KiB", False), ("huge", True)):
        for mib, depth in ((32, 2), (64, 2)):
            out[f"via {label} staging, {mib} MiB x{depth}"] = (
                small, mib * MIB, depth, staging_buffers(depth + 1, mib * MIB, is_huge))
    return out


def run(args: argparse.Namespace, work: Path) -> dict:
    nbytes = int(args.size_gb * GB) // 4096 * 4096
    cases = variants(nbytes)
    view = next(iter(cases.values()))[0]
    disk = DiskFloor(work, nbytes)
    pool = ThreadPoolExecutor(4)
    res: dict = {"bytes": nbytes, "cpus": os.cpu_count(), "dir": str(work),
                 "cpu": {"copy into staging (32 MiB)": [], "checksum xxh3-128": []},
                 "disk": {}}
    for rnd in range(args.rounds):
        res["cpu"]["copy into staging (32 MiB)"].append(copy_into_staging(view, 32 * MIB))
        res["cpu"]["checksum xxh3-128"].append(checksum(view, 32 * MIB))
        for name, case in [*cases.items(), ("LocalStore.write", None)]:
            before = disk.write()
            r = store_write(work, view) if case is None else direct_write(
                work, case[0], case[1], case[2], pool, case[3])
            after = disk.write()
            r.update(Bracket(r["seconds"], before, after).to_json())
            res["disk"].setdefault(name, []).append(r)
            print(f"round {rnd + 1}/{args.rounds} {name}: {r['seconds']:.2f} s "
                  f"(dd {before:.2f} | {after:.2f} s: {r['ratio']:.2f}x"
                  f"{' NOISY' if r['noisy'] else ''})", flush=True)
    disk.remove()
    pool.shutdown()
    return res


def _med(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}"


def print_report(res: dict) -> None:
    gb = res["bytes"] / GB
    print(f"\n{gb:.2f} GB, {res['cpus']} CPUs, {res['dir']}; median [min-max] over rounds\n")
    print("| piece | seconds | GB/s |")
    print("|---|---|---|")
    for name, times in res["cpu"].items():
        print(f"| {name} | {_med(times)} [{min(times):.3f}-{max(times):.3f}] | "
              f"{gb / statistics.median(times):.1f} |")
    print("\n| O_DIRECT write | writes s | fsync s | rename+dir fsync s | total s | "
          "total/dd floor | noisy | request KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in res["disk"].items():
        ratios = [r["ratio"] for r in runs]
        parts = [_med([r[k] for r in runs]) if k in runs[0] else "-"
                 for k in ("write_s", "fsync_s", "rename_s")]
        print(f"| {name} | {' | '.join(parts)} | {_med([r['seconds'] for r in runs])} | "
              f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | "
              f"{sum(r['noisy'] for r in runs)}/{len(runs)} | "
              f"{statistics.median([r['request_kib'] for r in runs]):.0f} |")
    floors = [v for runs in res["disk"].values() for r in runs for v in (r["before_s"],
                                                                         r["after_s"])]
    print(f"\ndd floor (O_DIRECT + fsync, fresh file) {statistics.median(floors):.2f} s median "
          f"({min(floors):.2f}-{max(floors):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="parent directory (default /tmp)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, metavar="JSON")
    args = parser.parse_args()
    if args.report:
        print_report(json.loads(Path(args.report).read_text()))
        return
    work = Path(tempfile.mkdtemp(prefix="write_path-", dir=args.dir or "/tmp"))
    try:
        res = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
