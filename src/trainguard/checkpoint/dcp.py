"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP) on trainguard stores.

DCP plans who writes what (replicated tensors once, each DTensor shard by its owner) and
reshards on load (saved on 4 ranks, restored on 2 or 1). trainguard supplies the storage
half, :class:`TrainguardWriter` and :class:`TrainguardReader`, so a sharded checkpoint
keeps the invariants of every other checkpoint::

    checkpoints/step-000000100/
        rank00000.<w>.distcp ... rankNNNNN.<w>.distcp   raw tensor bytes, one file per rank
        dcp-metadata.<w>.json           DCP's Metadata, as JSON (never pickle)
        state.<w>.json                  the non-tensor state tree (rank 0's)
        manifest.json                   created LAST by the coordinator: the commit

``<w>`` is the coordinator's token for this save (``format.member_name``): like every
save, a sharded one never writes a file name another save wrote, nor replaces a manifest.

Invariants:

* Each rank writes only its own files, through ``store.write`` (atomic per key), and
  reports their size and checksum to the coordinator in its ``WriteResult``s.
* DCP calls :meth:`TrainguardWriter.finish` on the coordinator only after gathering
  every rank's results without a failure; a rank that raises or dies makes the gather
  fail, so no manifest is written and the previous checkpoint stays the latest valid.
* The manifest lists every rank's files with size and xxh3-128, so ``list``, ``verify``,
  retention and ``trainguard ls|verify`` treat a sharded checkpoint like any other.
* Readers check each chunk's checksum before handing its bytes to DCP, and the metadata
  file's checksum (from the manifest) before parsing it.

Background (asynchronous) sharded saves are in :mod:`trainguard.checkpoint.dcp_background`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from trainguard.checkpoint import commit
from trainguard.checkpoint.format import (
    _CODES,
    DCP_METADATA,
    STATE_FILE,
    FileEntry,
    HashedChunks,
    Manifest,
    check_file,
    check_file_name,
    checksum,
    dtype_code,
    is_sharded,
    manifest_metrics,
    manifest_tags,
    member_name,
    new_writer,
    read_checked,
    step_dir,
    tensor_bytes,
    writer_versions,
)
from trainguard.checkpoint.schema import MAX_MANIFEST_BYTES, load_json
from trainguard.checkpoint.tree import check_tree, flatten, parse_state_file, restore_into
from trainguard.errors import CheckpointCorrupt, CheckpointExists, StateMismatch
from trainguard.store import Store

log = logging.getLogger("trainguard.checkpoint")

__all__ = ["DCP_METADATA", "TrainguardReader", "TrainguardWriter", "is_sharded",
           "load_sharded", "read_tree", "restore_state_sharded", "save_sharded",
           "save_state_sharded"]

DCP_SUFFIX = ".distcp"


@dataclass(frozen=True)
class Chunk:
    """Where one saved tensor chunk lies: ``length`` bytes of ``file`` from ``offset``.

    ``dtype``/``shape`` describe the bytes; ``checksum`` is their xxh3-128, checked
    before the bytes reach DCP (so a reader of one chunk need not read the whole file).
    """

    file: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    checksum: str
    file_size: int = 0
    file_checksum: str = ""


class TrainguardWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes one checkpoint directory of a trainguard store.

    Args:
        store: where the files go (every rank opens the same store).
        step: the checkpoint's step.
        make_manifest: builds the manifest from every file's entry and the save's token
            (coordinator only).
        state_json: the non-tensor state tree, written by the coordinator.
        on_commit: called on the coordinator right after the commit.
    """

    def __init__(self, store: Store, step: int,
                 make_manifest: Callable[[dict, str], Manifest],
                 state_json: bytes, on_commit: Callable[[Manifest], None] | None = None) -> None:
        super().__init__()
        self.store, self.step, self.key = store, step, step_dir(step)
        self._make_manifest, self._state_json = make_manifest, state_json
        self._on_commit = on_commit
        self.rank = 0
        self.manifest: Manifest | None = None
        self.writer = new_writer()  # the coordinator's names every file of the save

    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: one writer object per checkpoint."""

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Remember this rank (DCP passes it as ``rank=``)."""
        self.rank = kwargs.get("rank") or 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Keep DCP's plan as it is."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator, before any rank writes: refuse a committed step and give each rank
        its own file name. Leftovers of an interrupted save stay until retention: this
        save's names are its own, and a delete here could hit a live writer's files."""
        if commit.is_committed(self.store, self.step):
            raise CheckpointExists(f"step {self.step} is already committed at "
                                   f"{self.store.url}/{self.key}; save under a new step")
        return [dataclasses.replace(plan, storage_data=self._rank_file(i))
                for i, plan in enumerate(plans)]

    def _rank_file(self, rank: int) -> str:
        return member_name(f"rank{rank:05d}{DCP_SUFFIX}", self.writer)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items into its one file; results carry size and checksums."""
        name, placed, buffers, offset = plan.storage_data, [], [], 0
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"{item.index.fqn!r} is not a tensor: only tensors go through "
                                f"torch.distributed.checkpoint (the rest goes to state.json)")
            tensor = planner.resolve_data(item)
            view = tensor_bytes(tensor)
            placed.append((item, offset, len(view), tensor, checksum(view)))
            buffers.append(view)
            offset += len(view)
        stream = HashedChunks(lambda: buffers)
        self.store.write(f"{self.key}/{name}", stream)
        hasher = stream.hasher
        # Committed by this rank before it reports success: on a store whose commit is
        # per machine (a Modal volume mounted on each node of a cluster) the manifest
        # must never name a file that only this node's uncommitted view holds.
        self.store.commit()
        results = [WriteResult(index=item.index, size_in_bytes=length, storage_data=Chunk(
            name, start, length, dtype_code(tensor.dtype), tuple(tensor.shape), digest,
            hasher.size, hasher.hexdigest()))
            for item, start, length, tensor, digest in placed]
        future: Future = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank wrote: metadata, state.json, manifest (the commit)."""
        chunks = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_data = chunks
        files = {c.file: FileEntry(c.file_size, c.file_checksum) for c in chunks.values()}
        for rank, rank_results in enumerate(results):
            if not rank_results:  # a rank with nothing to write still wrote an empty file
                files[self._rank_file(rank)] = FileEntry(0, checksum(b""))
        for base, data in ((DCP_METADATA, encode_metadata(metadata)),
                           (STATE_FILE, self._state_json)):
            files[member_name(base, self.writer)] = self._write(member_name(base, self.writer),
                                                                data)
        manifest = self._make_manifest(files, self.writer)
        commit.publish(self.store, manifest)  # created last: its presence is the commit
        self.manifest = manifest
        if self._on_commit is not None:
            self._on_commit(manifest)

    def _write(self, name: str, data: bytes) -> FileEntry:
        self.store.write(f"{self.key}/{name}", data)
        return FileEntry(len(data), checksum(data))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Never picked by DCP's automatic storage selection."""
        return False


class TrainguardReader(StorageReader):
    """A DCP ``StorageReader`` over a committed sharded checkpoint.

    Args:
        store: the run's store.
        step: the checkpoint's step.
        manifest: its (already parsed) manifest: the checksums to check against.
    """

    def __init__(self, store: Store, step: int, manifest: Manifest) -> None:
        super().__init__()
        self.store, self.key, self.manifest = store, step_dir(step), manifest
        self.storage_data: dict = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        """Nothing to reset: one reader object per checkpoint."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read and check the metadata file against the manifest, then parse it."""
        name = self.manifest.name_of(DCP_METADATA)
        where = f"{self.key}/{name}"
        return decode_metadata(read_checked(self.store, where, self.manifest.files.get(name)),
                               where)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        """Keep the chunk locations of the metadata."""
        self.storage_data = metadata.storage_data or {}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Keep DCP's plan as it is."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Keep DCP's plans as they are."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read each needed chunk once, check its checksum, copy the requested slices."""
        cache: dict[Any, torch.Tensor] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise CheckpointCorrupt(f"{self.key}: {req.storage_index.fqn!r} is not a "
                                        f"tensor; trainguard never loads pickled objects")
            chunk = self.storage_data.get(req.storage_index)
            if chunk is None:
                raise CheckpointCorrupt(f"{self.key}/{DCP_METADATA}: no location for "
                                        f"{req.storage_index.fqn!r}")
            if req.storage_index not in cache:
                cache[req.storage_index] = self._load_chunk(chunk)
            source = cache[req.storage_index]
            pieces = zip(req.storage_offsets, req.lengths, strict=True)
            for dim, (start, length) in enumerate(pieces):
                source = source.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            if target.size() != source.size():
                raise StateMismatch(f"{req.dest_index.fqn!r}: checkpoint slice "
                                    f"{tuple(source.size())}, target {tuple(target.size())}")
            target.copy_(source)
            planner.commit_tensor(req, target)
        future: Future = Future()
        future.set_result(None)
        return future

    def _load_chunk(self, chunk: Chunk) -> torch.Tensor:
        where = f"{self.key}/{chunk.file}"
        if chunk.file not in self.manifest.files:
            raise CheckpointCorrupt(f"{where}: not listed in the manifest")
        data = self.store.read(where, chunk.offset, chunk.length)
        check_file(where, data, FileEntry(chunk.length, chunk.checksum))
        dtype = _CODES[chunk.dtype]
        numel = 1
        for dim in chunk.shape:
            numel *= dim
        if numel * torch.empty((), dtype=dtype).element_size() != chunk.length:
            raise CheckpointCorrupt(f"{where}: chunk of {chunk.length} bytes at {chunk.offset} "
                                    f"does not hold a {chunk.dtype} tensor of shape "
                                    f"{list(chunk.shape)}")
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if chunk.length else \
            torch.empty(0, dtype=dtype)
        return flat.reshape(chunk.shape)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Never picked by DCP's automatic storage selection."""
        return False


# -- save and load ----------------------------------------------------------------------------


def save_sharded(store: Store, step: int, tensors: dict[str, torch.Tensor], state_json: bytes,
                 make_manifest: Callable[[dict, str], Manifest], *, process_group: Any = None,
                 on_commit: Callable[[Manifest], None] | None = None) -> Manifest | None:
    """Save ``tensors`` (plain tensors and DTensors) as the checkpoint of ``step``.

    A collective: every rank of ``process_group`` calls it with the same step; with no
    process group this process alone writes the whole state.

    Returns:
        The committed manifest on the coordinator (rank 0 of the group), None elsewhere.

    Raises:
        torch.distributed.checkpoint.api.CheckpointException: a rank failed; nothing
            is committed (raised on every rank).
    """
    writer = TrainguardWriter(store, step, make_manifest, state_json, on_commit)
    started = time.monotonic()
    dcp.save(tensors, storage_writer=writer, planner=DefaultSavePlanner(),
             process_group=process_group, no_dist=process_group is None)
    if writer.manifest is not None:
        log.info("committed sharded step %d (%d files, %.2f s) to %s", step,
                 len(writer.manifest.files), time.monotonic() - started, store.url)
    return writer.manifest


def load_sharded(store: Store, step: int, manifest: Manifest,
                 targets: dict[str, torch.Tensor], *, process_group: Any = None) -> None:
    """Load the tensors of a sharded checkpoint into ``targets`` in place (resharding).

    A collective over ``process_group``; with no process group it runs in this process
    alone (restore on one rank: DTensors saved on N ranks load into full tensors).
    """
    reader = TrainguardReader(store, step, manifest)
    dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(),
             process_group=process_group, no_dist=process_group is None)


def read_tree(store: Store, step: int, manifest: Manifest) -> tuple[Any, dict]:
    """The checked ``state.json`` tree and the tensor layout (name -> (dtype, shape)).

    Raises:
        CheckpointCorrupt: a file is missing, corrupt, or not what it should be.
    """
    key = step_dir(step)
    state_key, meta_key = (f"{key}/{manifest.name_of(base)}" for base in (STATE_FILE,
                                                                          DCP_METADATA))
    raw = read_checked(store, state_key, manifest.files.get(manifest.state_file))
    metadata = decode_metadata(read_checked(store, meta_key, manifest.files.get(
        manifest.name_of(DCP_METADATA))), meta_key)
    tree, _refs = parse_state_file(raw, state_key)
    layout = {fqn: (md.properties.dtype, tuple(md.size))
              for fqn, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}
    check_tree(tree, state_key, layout)  # before any tensor is loaded
    return tree, layout


def load_targets(live: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """Where each saved tensor loads: the live tensor when it matches (DTensors reshard
    in place), else a new full CPU tensor (state the live objects do not hold yet)."""
    targets = {}
    for name, (dtype, shape) in layout.items():
        tensor = live.get(name)
        if tensor is not None and tensor.dtype == dtype and tuple(tensor.shape) == shape:
            targets[name] = tensor
        elif tensor is not None and _is_dtensor(tensor):
            raise StateMismatch(f"{name!r}: checkpoint holds {dtype} {shape}, live DTensor "
                                f"is {tensor.dtype} {tuple(tensor.shape)}")
        else:
            targets[name] = torch.empty(shape, dtype=dtype)
    return targets


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def save_state_sharded(store: Store, step: int, state: dict, *, metrics: dict | None = None,
                       tags: dict[str, str] | None = None, reason: str = "periodic",
                       process_group: Any = None,
                       on_commit: Callable[[Manifest], None] | None = None) -> Manifest | None:
    """Save a training state (modules, optimizers, DTensors, plain values) sharded.

    Tensors go through DCP (each rank writes its shards); the JSON tree of everything
    else goes to ``state.json`` (the coordinator's). A collective over ``process_group``;
    blocks until the commit (``dcp_background.start_save_state_sharded`` returns once staged).

    Returns:
        The committed manifest on the coordinator, None on the other ranks.
    """
    tensors, state_json, make_manifest = prepare_save(step, state, metrics, tags, reason)
    return save_sharded(store, step, tensors, state_json, make_manifest,
                        process_group=process_group, on_commit=on_commit)


def prepare_save(step: int, state: dict, metrics: dict | None, tags: dict[str, str] | None,
                 reason: str) -> tuple[dict[str, torch.Tensor], bytes,
                                       Callable[[dict, str], Manifest]]:
    """The tensors, the ``state.json`` bytes and the manifest maker of a sharded save.

    Raises:
        TypeError: the state holds a value that cannot be saved without pickle.
    """
    tree, tensors = flatten(state)
    metrics, tags = manifest_metrics(metrics), manifest_tags(tags)
    state_json = json.dumps({"tree": tree}, separators=(",", ":")).encode()
    versions = writer_versions()

    def make_manifest(files: dict[str, FileEntry], writer: str) -> Manifest:
        return Manifest(step=step, created_at=time.time(), files=files, metrics=metrics,
                        tags=tags, reason=reason, versions=versions, writer=writer)

    return tensors, state_json, make_manifest


def restore_state_sharded(store: Store, state: dict, step: int, manifest: Manifest, *,
                          process_group: Any = None) -> int:
    """Load a sharded checkpoint into ``state`` in place; a collective over the group.

    Live DTensors are resharded in place to their current placements; plain tensors
    load whole on every rank.

    Raises:
        CheckpointCorrupt: a file or chunk fails its checksum (nothing is applied).
        StateMismatch: the checkpoint does not fit ``state``.
    """
    tree, layout = read_tree(store, step, manifest)
    _, live = flatten(state)
    targets = load_targets(live, layout)
    load_sharded(store, step, manifest, targets, process_group=process_group)
    if not isinstance(tree, dict):
        raise StateMismatch(f"{step_dir(step)}/{STATE_FILE}: top level is not a dict")
    restore_into(state, tree, targets)
    return step


# -- DCP metadata as JSON (DCP's own file format is a pickle; ours is not) ------------------


def encode_metadata(metadata: Metadata) -> bytes:
    """DCP ``Metadata`` (tensors only, with :class:`Chunk` locations) as JSON bytes."""
    tensors = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"{fqn!r} is not a tensor: only tensors go through DCP")
        tensors[fqn] = {"dtype": dtype_code(md.properties.dtype),
                        "requires_grad": bool(md.properties.requires_grad),
                        "size": list(md.size),
                        "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks]}
    locations = [{"fqn": index.fqn, "index_offset": None if index.offset is None
                  else list(index.offset), **dataclasses.asdict(chunk)}
                 for index, chunk in metadata.storage_data.items()]
    planner = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    doc = {"format": "trainguard.dcp", "version": metadata.version, "tensors": tensors,
           "locations": locations, "planner_data": planner}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_metadata(raw: memoryview | bytes, where: str) -> Metadata:
    """Parse :func:`encode_metadata` output back into DCP ``Metadata``.

    Raises:
        CheckpointCorrupt: not our JSON, or a malformed entry.
    """
    doc = load_json(raw, where, "DCP metadata", MAX_MANIFEST_BYTES * 4)
    try:
        if doc.get("format") != "trainguard.dcp":
            raise ValueError("not a trainguard DCP metadata file")
        tensors = {fqn: TensorStorageMetadata(
            properties=TensorProperties(dtype=_CODES[t["dtype"]],
                                        requires_grad=bool(t["requires_grad"])),
            size=torch.Size(t["size"]),
            chunks=[ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in t["chunks"]])
            for fqn, t in doc["tensors"].items()}
        storage = {}
        for loc in doc["locations"]:
            index = MetadataIndex(loc.pop("fqn"), loc.pop("index_offset"))
            if not all(type(d) is int and d >= 0 for d in loc["shape"]):
                raise ValueError(f"chunk shape {loc['shape']!r} is not a list of sizes")
            loc["shape"] = tuple(loc["shape"])
            chunk = Chunk(**loc)
            check_file_name(chunk.file)
            if chunk.dtype not in _CODES or not all(
                    type(n) is int and n >= 0 for n in (chunk.offset, chunk.length)):
                raise ValueError(f"chunk {chunk.file}@{chunk.offset!r}: bad dtype or range")
            storage[index] = chunk
        planner = {k: tuple(v) for k, v in doc["planner_data"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise CheckpointCorrupt(f"{where}: malformed DCP metadata ({exc!r})") from exc
    return Metadata(state_dict_metadata=tensors, planner_data=planner, storage_data=storage,
                    storage_meta=StorageMeta(), version=doc.get("version"))
