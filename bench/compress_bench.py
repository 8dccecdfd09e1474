"""Does lossless compression of half-precision shards pay for a checkpoint? (issue 16)

Trained-looking weights -- normal(0, ``--std``), cast to bf16 / fp16 (and float32 for
reference) -- are compressed with zstd at fast levels, as they are and byte-grouped (the
high bytes of every element together, then the low bytes: sign and exponent are in the
high byte and compress, the low mantissa bits are close to random). Reported per codec:
ratio (compressed / raw), compress and decompress MB/s on one core and on all of them
(``--threads``, independent pieces), and what that means for time-to-durable against a
disk writing ``--disk-gbs`` GB/s: compression overlapped with the write (pipelined), so
durable ~ max(compress, write of the compressed bytes) vs write of the raw bytes.

Needs ``zstandard`` (not a trainguard dependency): ``pip install zstandard``.

Run:  python bench/compress_bench.py --mib 256 --disk-gbs 0.35 1.2 1.5 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import zstandard

MIB = 1 << 20


def weights(nbytes: int, dtype: torch.dtype, std: float) -> bytes:
    torch.manual_seed(0)
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    return torch.randn(n).mul_(std).to(dtype).view(torch.uint8).numpy().tobytes()


def byte_group(raw: bytes, width: int) -> bytes:
    """Byte ``k`` of every element together, for k = width-1 (high) down to 0."""
    planes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, width).t()
    return planes.flip(0).contiguous().numpy().tobytes()


def _pieces(data: bytes, n: int) -> list[memoryview]:
    step = -(-len(data) // n)
    view = memoryview(data)
    return [view[i:i + step] for i in range(0, len(data), step)]


def timed(fn, pieces: list, threads: int) -> tuple[float, list]:
    start = time.perf_counter()
    if threads == 1:
        out = [fn(p) for p in pieces]
    else:
        with ThreadPoolExecutor(threads) as pool:  # zstandard releases the GIL
            out = list(pool.map(fn, pieces))
    return time.perf_counter() - start, out


def measure(raw: bytes, width: int, level: int, grouped: bool, threads: int) -> dict:
    data = byte_group(raw, width) if grouped else raw
    def comp(piece):  # one (de)compressor per call: they are not thread-safe
        return zstandard.ZstdCompressor(level=level).compress(piece)

    def dec(piece):
        return zstandard.ZstdDecompressor().decompress(piece)

    one_s, packed = timed(comp, _pieces(data, 8), 1)
    all_s, _ = timed(comp, _pieces(data, 8), threads)
    dec_s, back = timed(dec, packed, threads)
    assert b"".join(back) == data
    size = sum(len(p) for p in packed)
    mb = len(raw) / 1e6
    return {"level": level, "grouped": grouped, "ratio": size / len(raw),
            "compress_mbs_1": mb / one_s, "compress_mbs_all": mb / all_s,
            "decompress_mbs_all": mb / dec_s}


def durable_gain(r: dict, disk_gbs: float) -> float:
    """Time-to-durable with compression (pipelined, all cores) over without, per GB."""
    raw_write = 1 / disk_gbs
    compressed = max(1e3 / r["compress_mbs_all"], r["ratio"] / disk_gbs)
    return compressed / raw_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of weights per dtype")
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--levels", type=int, nargs="+", default=[-5, -1, 1, 3])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--disk-gbs", type=float, nargs="+", default=[0.35, 1.2, 1.5])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                        ("fp32", torch.float32)):
        raw = weights(args.mib * MIB, dtype, args.std)
        width = torch.empty((), dtype=dtype).element_size()
        for grouped in (False, True):
            for level in args.levels:
                r = {"dtype": name, **measure(raw, width, level, grouped, args.threads)}
                rows.append(r)
                gains = " ".join(f"{durable_gain(r, g):.2f}x@{g}GB/s" for g in args.disk_gbs)
                print(f"{name} {'grouped' if grouped else 'plain  '} zstd {level:>2}: "
                      f"ratio {r['ratio']:.3f}, compress {r['compress_mbs_1']:.0f} MB/s "
                      f"(1 core) {r['compress_mbs_all']:.0f} MB/s ({args.threads} threads), "
                      f"decompress {r['decompress_mbs_all']:.0f} MB/s; durable with/without: "
                      f"{gains}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
