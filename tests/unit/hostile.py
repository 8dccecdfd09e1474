"""Helpers that plant hostile content in a real run directory (issue 14).

A run holds a good step 1 and a step 2 whose manifest, state file or shard a test then
replaces. ``rewrite_member`` keeps the manifest's size and checksum in step with the new
bytes, so that what is tested is the parser behind the checksum, not the checksum.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
import xxhash

from trainguard import CheckpointManager
from trainguard.checkpoint.format import MANIFEST


def state(step: int) -> dict:
    """The training state saved at ``step`` (two tensors and a counter)."""
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4, 4, generator=gen), "b": torch.randn(3, generator=gen),
            "step": step}


def blank() -> dict:
    """A state of the same shape to restore into."""
    return {"w": torch.zeros(4, 4), "b": torch.zeros(3), "step": -1}


def make_run(run: Path, steps=(1, 2)) -> Path:
    """A run directory holding good checkpoints at ``steps``."""
    mgr = CheckpointManager(run)
    for step in steps:
        mgr.save(step, state(step), metrics={"loss": 1.0 / step})
    mgr.close()
    return run


def step_path(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:09d}"


def manifest_doc(run: Path, step: int) -> dict:
    return json.loads((step_path(run, step) / MANIFEST).read_text())


def write_manifest(run: Path, step: int, doc: dict | bytes | str) -> None:
    raw = doc if isinstance(doc, (bytes, str)) else json.dumps(doc)
    path = step_path(run, step) / MANIFEST
    path.write_bytes(raw.encode() if isinstance(raw, str) else raw)


def member(run: Path, step: int, kind: str) -> Path:
    """The state file (``kind="state"``) or the first shard (``"shard"``) of ``step``."""
    names = sorted(manifest_doc(run, step)["files"])
    suffix = ".json" if kind == "state" else ".safetensors"
    prefix = "state" if kind == "state" else "tensors"
    return step_path(run, step) / next(n for n in names
                                       if n.startswith(prefix) and n.endswith(suffix))


def rewrite_member(run: Path, step: int, path: Path, data: bytes) -> None:
    """Replace a file of ``step`` and record its new size and checksum in the manifest."""
    path.write_bytes(data)
    doc = manifest_doc(run, step)
    doc["files"][path.name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    write_manifest(run, step, doc)


def state_doc(run: Path, step: int) -> dict:
    return json.loads(member(run, step, "state").read_text())


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header dict and its data section."""
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data
