"""The floors ``ckpt_bench.py`` holds every method to, and the brackets that make them fair.

A shared VM's disk has a burst budget (here it alternates between ~1.2 GB/s and
~0.35 GB/s) and its memory bandwidth drifts too, so one floor measured once per repeat
is biased: after other methods drained the budget it is slow (flattering ratios),
measured first it is fast (the opposite). So every timed save and restore is
**bracketed**: the floor is measured on the same bytes, on the same file system,
immediately before and immediately after it, and the ratio is against the mean of the
two. When the two differ by more than :data:`NOISY` the disk changed phase during the
measurement and the run is marked noisy.

* write floor: ``dd bs=64M oflag=direct conv=fsync`` of the state's bytes (rounded up to
  4 KiB) into a fresh file: O_DIRECT like trainguard's writes, and the fsync because
  time-to-durable ends with one (the device has a write-back cache);
* read floor: ``dd bs=64M iflag=direct`` of that file, the page cache dropped first;
* copy floor: every tensor into one preallocated, touched buffer (pinned D2H for CUDA
  state, memcpy for CPU state), best of 3.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: Brackets that differ by more than this factor mark a run noisy.
NOISY = 1.5
_ALIGN = 4096


@dataclass
class Bracket:
    """A measurement and the floor taken right before and right after it."""

    seconds: float
    before_s: float
    after_s: float

    @property
    def floor_s(self) -> float:
        return (self.before_s + self.after_s) / 2

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor_s

    @property
    def spread(self) -> float:
        return max(self.before_s, self.after_s) / min(self.before_s, self.after_s)

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY

    def to_json(self) -> dict:
        return {**asdict(self), "floor_s": self.floor_s, "ratio": self.ratio,
                "spread": self.spread, "noisy": self.noisy}


def drop_caches(paths: list[Path] = ()) -> str:
    """Make the next read of ``paths`` cold; returns how.

    ``drop_caches`` (root) drops the whole page cache; without it each file's cached
    pages are dropped with ``posix_fadvise(DONTNEED)`` (works for clean pages: files are
    fsync'd first). O_DIRECT reads (dd's, trainguard's large reads) bypass it anyway.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in _files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise(DONTNEED)"


def _files(paths):
    for path in map(Path, paths):
        if path.is_dir():
            yield from (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        elif path.is_file():
            yield path


def _dd(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", *args], check=True, capture_output=True)
    return time.perf_counter() - start


class DiskFloor:
    """dd write and cold read floors of ``nbytes`` in ``work`` (see module docs)."""

    def __init__(self, work: Path, nbytes: int) -> None:
        self.path = Path(work) / "dd-floor.bin"
        self.nbytes = -(-nbytes // _ALIGN) * _ALIGN

    def write(self) -> float:
        """Seconds to write a fresh file of ``nbytes`` with O_DIRECT, fsync included."""
        self.path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.sync()  # the unlink's discards and earlier writes are not timed
        return _dd("if=/dev/zero", f"of={self.path}", "bs=64M", f"count={self.nbytes}",
                   "iflag=count_bytes", "oflag=direct", "conv=fsync")

    def read(self) -> float:
        """Seconds to read the file cold with O_DIRECT (it must exist: :meth:`write`)."""
        drop_caches([self.path])
        return _dd(f"if={self.path}", "of=/dev/null", "bs=64M", "iflag=direct")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


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


def spread_of(values: list[float]) -> dict:
    """Median, min and max of ``values`` (seconds or ratios)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
