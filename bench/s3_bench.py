"""Object-store throughput: trainguard's ObjectStore against boto3 and s3fs, one run.

A moto S3 server (server mode, 127.0.0.1) is started; the same bytes are then uploaded and
downloaded by:

* ``trainguard``  -- ``CheckpointManager("s3://...").save(blocking=True)`` of a state whose
  tensors total ``--size-mb``, then ``restore`` (every byte checksum-verified);
* ``obstore``     -- trainguard's ``ObjectStore.write/read`` of one object (no checkpoint
  format, no checksums): the transport alone;
* ``boto3``       -- ``upload_fileobj``/``download_fileobj`` with a 16 MiB multipart
  ``TransferConfig`` and 8 threads (the same part size and concurrency as ours);
* ``s3fs``        -- ``pipe``/``cat`` of one object.

The server runs on the same 2 cores as the clients, so absolute numbers say little about
a real bucket; the ratios between clients in one run are the point. Every download is
compared with what was uploaded.

Run: python bench/s3_bench.py --size-mb 256 [--repeat 3] [--json out.json]
(needs the 's3' and 'bench' extras: obstore, moto[server], boto3, s3fs)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.s3server import MotoServer

from trainguard import CheckpointManager
from trainguard.store.object import ObjectStore

MB = 1e6


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_trainguard(bucket: str, state: dict, rep: int) -> tuple[float, float]:
    url = f"s3://{bucket}/tg-{rep}"
    mgr = CheckpointManager(url)
    up = timed(lambda: mgr.save(1, state, blocking=True))
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    down = timed(lambda: CheckpointManager(url).restore(target))
    assert all(torch.equal(target[k], v) for k, v in state.items())
    return up, down


def bench_obstore(bucket: str, blob: bytes, rep: int) -> tuple[float, float]:
    store = ObjectStore(f"s3://{bucket}/obs-{rep}")
    up = timed(lambda: store.write("blob", blob))
    out = {}
    down = timed(lambda: out.setdefault("b", store.read("blob")))
    assert bytes(out["b"]) == blob
    return up, down


def bench_boto3(bucket: str, blob: bytes, rep: int, endpoint: str) -> tuple[float, float]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=endpoint)
    config = TransferConfig(multipart_chunksize=16 << 20, multipart_threshold=16 << 20,
                            max_concurrency=8)
    key = f"boto-{rep}/blob"
    up = timed(lambda: client.upload_fileobj(io.BytesIO(blob), bucket, key, Config=config))
    sink = io.BytesIO()
    down = timed(lambda: client.download_fileobj(bucket, key, sink, Config=config))
    assert sink.getvalue() == blob
    return up, down


def bench_s3fs(bucket: str, blob: bytes, rep: int, endpoint: str) -> tuple[float, float]:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    path = f"{bucket}/s3fs-{rep}/blob"
    up = timed(lambda: fs.pipe(path, blob))
    out = {}
    down = timed(lambda: out.setdefault("b", fs.cat(path)))
    assert out["b"] == blob
    return up, down


def make_state(size_mb: int) -> dict:
    torch.manual_seed(0)
    per = 4 << 20  # 16 MiB float32 tensors
    n = max(1, int(size_mb * MB) // (per * 4))
    return {f"layer{i}": torch.randn(per) for i in range(n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    server = MotoServer()
    bucket = "bench"
    server.create_bucket(bucket)
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    state = make_state(args.size_mb)
    blob = b"".join(t.numpy().tobytes() for t in state.values())
    nbytes = len(blob)
    methods = {
        "trainguard": lambda r: bench_trainguard(bucket, state, r),
        "obstore (ours)": lambda r: bench_obstore(bucket, blob, r),
        "boto3": lambda r: bench_boto3(bucket, blob, r, server.endpoint),
        "s3fs": lambda r: bench_s3fs(bucket, blob, r, server.endpoint),
    }
    results = {}
    try:
        for rep in range(args.repeat):
            for name, fn in methods.items():
                up, down = fn(rep)
                results.setdefault(name, {"up": [], "down": []})
                results[name]["up"].append(up)
                results[name]["down"].append(down)
                print(f"rep {rep + 1}/{args.repeat} {name}: up {up:.2f} s, down {down:.2f} s",
                      flush=True)
    finally:
        server.stop()
    print(f"\n{nbytes / MB:.0f} MB, moto server on 127.0.0.1, median of {args.repeat}\n")
    print(f"| {'method':>14} | up s | up MB/s | down s | down MB/s | up vs boto3 | down vs boto3 |")
    print(f"|{'-' * 16}|------|---------|--------|-----------|-------------|---------------|")
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    for name, m in med.items():
        print(f"| {name:>14} | {m['up']:4.2f} | {nbytes / MB / m['up']:7.0f} | {m['down']:6.2f} | "
              f"{nbytes / MB / m['down']:9.0f} | {med['boto3']['up'] / m['up']:10.2f}x | "
              f"{med['boto3']['down'] / m['down']:12.2f}x |")
    doc = {"bytes": nbytes, "repeat": args.repeat, "median_s": med, "all_s": results}
    print("JSON: " + json.dumps(doc, separators=(",", ":")))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
