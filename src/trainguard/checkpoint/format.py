"""The on-disk format of one checkpoint, and the checks that keep readers safe.

Layout of a run directory::

    RUN/checkpoints/step-000001200/
        tensors-00000.<writer>.safetensors  tensor shards (each opens with safe_open)
        state.<writer>.json                 the non-tensor state tree (never pickle)
        manifest.json                       written LAST: its presence is the commit

``<writer>`` is a random token drawn by each save (format version 2; version 1 files are
named without it and still read). So two saves of one step, even by two processes that
both think they are the writer, never write the same file name: a save can only add
files, never change one that a committed manifest names. The manifest itself is created
with a create-if-absent (``Store.create``) and so is never replaced either.

A directory without a manifest that parses into the schema and checks out does not exist
for readers. Names in a manifest are never trusted: each must be a plain file name inside
its own checkpoint directory (no ``..``, no absolute paths, no separators).
"""

from __future__ import annotations

import json
import re
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from trainguard.checkpoint.schema import (
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    Fields,
    as_int,
    as_str,
    load_json,
)
from trainguard.errors import CheckpointCorrupt, UnsafePath
from trainguard.store.base import Store

FORMAT_NAME = "trainguard.checkpoint"
FORMAT_VERSION = 2  # 2: file names carry the writer token (1: fixed names, still read)
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
#: Marks a deleted checkpoint whose files later (incremental) checkpoints still reference.
RETIRED = "retired.json"
CHECKSUM_ALGO = "xxh3_128"
_STEP_DIR = re.compile(r"^step-(\d{9,})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_WRITER = re.compile(r"[0-9a-f]{8,64}")
_HEX128 = re.compile(r"[0-9a-f]{32}")
#: Newest unix time a manifest may carry (the last second of year 9999).
MAX_TIME = 253402300799.0


def new_writer() -> str:
    """A token unique to one save: its files are named with it."""
    return secrets.token_hex(8)


def member_name(base: str, writer: str) -> str:
    """The name of the file ``base`` (``state.json``) of the save ``writer``.

    ``member_name("tensors-00000.safetensors", "9f..")`` is
    ``"tensors-00000.9f...safetensors"``; with no writer (format 1) the base name.
    """
    if not writer:
        return base
    stem, dot, ext = base.partition(".")
    return f"{stem}.{writer}{dot}{ext}"


def step_dir(step: int) -> str:
    """Store key of the directory holding ``step`` (``checkpoints/step-000000042``)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"{CHECKPOINTS_DIR}/step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a ``step-NNNNNNNNN`` directory name, or None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def check_file_name(name: object) -> str:
    """Refuse a manifest file name that could address anything outside its directory.

    Raises:
        CheckpointCorrupt: the name is absolute, has ``..`` or a separator, or odd chars.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise CheckpointCorrupt(
            f"manifest names the file {name!r}, which is not a plain file name inside the "
            f"checkpoint directory; refusing to read it"
        )
    return name


class Hasher:
    """Streaming checksum (xxh3-128: ~15 GB/s on one core, releases the GIL)."""

    algo = CHECKSUM_ALGO

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self.size = 0

    def update(self, data: memoryview | bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class HashedChunks:
    """A re-iterable stream of a file's chunks that checksums them as they go by.

    Each iteration starts a fresh checksum over a fresh pass of ``make_chunks()``, so a
    store may retry a failed upload by iterating again (a generator could not be
    replayed), and ``entry()`` describes the bytes of the last, complete pass.
    """

    def __init__(self, make_chunks) -> None:
        self._make_chunks = make_chunks
        self.hasher = Hasher()

    def __iter__(self) -> Iterator[memoryview]:
        self.hasher = hasher = Hasher()
        for chunk in self._make_chunks():
            hasher.update(chunk)
            yield chunk

    def entry(self) -> FileEntry:
        """Size and checksum of what the last pass yielded."""
        return FileEntry(self.hasher.size, self.hasher.hexdigest())


def checksum(data: memoryview | bytes) -> str:
    """xxh3-128 hex digest of a whole buffer."""
    return xxhash.xxh3_128(data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, as recorded in its manifest."""

    size: int
    checksum: str

    def to_json(self) -> dict:
        return {"size": self.size, CHECKSUM_ALGO: self.checksum}


@dataclass(frozen=True)
class FileRef:
    """A file of an earlier checkpoint that an incremental checkpoint reads tensors from.

    The location is rebuilt from a validated step number and a validated plain file
    name, so a manifest cannot point a reader outside the checkpoints directory.
    """

    step: int
    name: str
    size: int
    checksum: str

    @property
    def key(self) -> str:
        """Store key of the referenced file."""
        return f"{step_dir(self.step)}/{self.name}"

    def to_json(self) -> dict:
        return {"step": self.step, "name": self.name, "size": self.size,
                CHECKSUM_ALGO: self.checksum}

    @classmethod
    def from_json(cls, fields: Fields) -> FileRef:
        """Parse one entry of a manifest's ``refs`` (see :class:`Fields`)."""
        return cls(fields.int("step"), check_file_name(fields.get("name")), fields.int("size"),
                   fields.str(CHECKSUM_ALGO, _HEX128))


@dataclass(frozen=True)
class Manifest:
    """The commit record of one checkpoint.

    Attributes:
        step: training step the checkpoint holds.
        created_at: unix time of the commit.
        files: file name -> size and checksum, for every file of the checkpoint.
        metrics: user metrics at that step (e.g. ``{"val_loss": 0.31}``).
        tags: free-form user strings.
        reason: why it was saved ("periodic", "final", "preempted", "error", ...).
        versions: library versions that wrote it.
        refs: files of earlier checkpoints holding tensors this one did not rewrite
            (incremental saves); verified like the checkpoint's own files.
        writer: the token of the save that wrote it, in its file names ("" in format 1).
    """

    step: int
    created_at: float
    files: dict[str, FileEntry]
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    reason: str = "periodic"
    versions: dict[str, str] = field(default_factory=dict)
    refs: tuple[FileRef, ...] = ()
    writer: str = ""

    def name_of(self, base: str) -> str:
        """This checkpoint's name for the file ``base`` (``state.json``, ...)."""
        return member_name(base, self.writer)

    @property
    def state_file(self) -> str:
        """The name of this checkpoint's state file."""
        return self.name_of(STATE_FILE)

    @property
    def referenced_bytes(self) -> int:
        """Bytes of earlier checkpoints' files that this one reads from."""
        return sum(ref.size for ref in self.refs)

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the checkpoint's files."""
        return sum(entry.size for entry in self.files.values())

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if self.writer else 1,
            "step": self.step,
            "created_at": self.created_at,
            "reason": self.reason,
            "metrics": self.metrics,
            "tags": self.tags,
            "checksum_algo": CHECKSUM_ALGO,
            "files": {name: entry.to_json() for name, entry in sorted(self.files.items())},
            "total_bytes": self.total_bytes,
            "refs": [ref.to_json() for ref in self.refs],
            "versions": self.versions,
        }
        if self.writer:
            doc["writer"] = self.writer
        return json.dumps(doc, indent=1, sort_keys=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview, where: str) -> Manifest:
        """Parse a manifest into the schema; the one parser every reader uses.

        Raises:
            CheckpointCorrupt: not JSON, too big or deep, not a trainguard manifest, a newer
                format, or any field of the wrong type or range (named in the message).
        """
        doc = Fields(load_json(raw, where, "manifest", MAX_MANIFEST_BYTES), where)
        if doc.doc.get("format") != FORMAT_NAME:
            raise CheckpointCorrupt(f"{where}: not a trainguard manifest (no \"format\": "
                                    f"\"{FORMAT_NAME}\")")
        version = doc.get("format_version", None)
        if type(version) is int and version > FORMAT_VERSION:
            raise CheckpointCorrupt(
                f"{where}: format version {version} is newer than this trainguard reads "
                f"({FORMAT_VERSION}); upgrade trainguard")
        version = doc.int("format_version", lo=1, hi=FORMAT_VERSION)
        if doc.get("checksum_algo", CHECKSUM_ALGO) != CHECKSUM_ALGO:
            raise doc.bad("checksum_algo", f"must be {CHECKSUM_ALGO!r}", doc.get("checksum_algo"))
        metrics = doc.obj("metrics", {})
        return cls(
            step=doc.int("step"),
            created_at=doc.number("created_at", finite=True, lo=0.0, hi=MAX_TIME),
            files=_parse_files(doc.obj("files")),
            metrics={name: metrics.number(name, finite=False) for name in metrics.doc},
            tags=_str_map(doc.obj("tags", {})),
            reason=doc.str("reason", default="periodic", max_len=200),
            versions=_str_map(doc.obj("versions", {})),
            refs=tuple(FileRef.from_json(Fields(ref, where, f"refs[{i}]"))
                       for i, ref in enumerate(doc.list("refs", []))),
            writer=doc.str("writer", _WRITER) if version >= 2 else "",
        )


#: A manifest listing this file marks a sharded checkpoint (torch.distributed.checkpoint).
DCP_METADATA = "dcp-metadata.json"


def is_sharded(manifest: Manifest) -> bool:
    """Whether ``manifest`` describes a checkpoint written through DCP (``dcp.py``)."""
    return manifest.name_of(DCP_METADATA) in manifest.files


def manifest_metrics(metrics: dict | None) -> dict[str, float]:
    """``metrics`` as a manifest records them: names to floats (one-element tensors too).

    Raises:
        TypeError: a value is not a number.
    """
    out = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
        out[str(name)] = float(value)
    return out


def manifest_tags(tags: dict | None) -> dict[str, str]:
    """``tags`` as a manifest records them: strings to strings."""
    return {str(k): str(v) for k, v in (tags or {}).items()}


def writer_versions() -> dict[str, str]:
    """The versions a manifest records: what wrote the checkpoint."""
    import platform

    import safetensors

    from trainguard._version import __version__

    return {"trainguard": __version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def check_file(where: str, data: memoryview | bytes, entry: FileEntry) -> None:
    """Raise :class:`CheckpointCorrupt` unless ``data`` has ``entry``'s size and checksum."""
    if len(data) != entry.size:
        raise CheckpointCorrupt(f"{where}: size {len(data)} bytes, manifest says {entry.size}")
    if checksum(data) != entry.checksum:
        raise CheckpointCorrupt(f"{where}: checksum mismatch (content changed after the "
                                f"commit: disk or copy corruption)")


def read_checked(store: Store, key: str, entry: FileEntry | None) -> memoryview:
    """Read ``key`` whole and check it against its manifest entry.

    Raises:
        CheckpointCorrupt: not in the manifest, missing, or size/checksum mismatch.
    """
    if entry is None:
        raise CheckpointCorrupt(f"{key}: not listed in the manifest")
    try:
        data = store.read(key)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{key}: missing") from None
    check_file(key, data, entry)
    return data


def _parse_files(files: Fields) -> dict[str, FileEntry]:
    out = {}
    for name in files.doc:
        entry = files.obj(check_file_name(name))
        out[name] = FileEntry(entry.int("size"), entry.str(CHECKSUM_ALGO, _HEX128))
    return out


def _str_map(fields: Fields) -> dict[str, str]:
    return {name: fields.str(name) for name in fields.doc}


def read_manifest(store, key: str) -> Manifest:
    """Read and parse the manifest at ``key`` of ``store`` (size-checked before reading).

    Raises:
        FileNotFoundError: there is no manifest.
        CheckpointCorrupt: it is not a valid manifest, or is a link or special file.
    """
    try:
        size = store.size(key)
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointCorrupt(f"{key}: manifest of {size} bytes is over the limit of "
                                    f"{MAX_MANIFEST_BYTES} bytes; not read")
        raw = store.read(key)
    except UnsafePath as exc:
        raise CheckpointCorrupt(f"{key}: {exc}") from None
    return Manifest.from_bytes(raw, key)


# -- safetensors ----------------------------------------------------------------------------

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in [("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("complex64", "C64")]:
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a tensor: zero-copy for contiguous CPU tensors, else one copy."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass
class ShardPlan:
    """Tensors of one safetensors file, laid out in order (largest element size first)."""

    name: str
    tensors: list[tuple[str, torch.Tensor]]

    def header(self) -> bytes:
        """The safetensors header: 8-byte little-endian length, then padded JSON."""
        meta: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "trainguard"}}
        offset = 0
        for key, tensor in self.tensors:
            nbytes = tensor.numel() * tensor.element_size()
            meta[key] = {"dtype": dtype_code(tensor.dtype), "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        body = json.dumps(meta, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)  # keeps every tensor aligned to its element size
        return struct.pack("<Q", len(body)) + body

    def chunks(self) -> Iterator[memoryview]:
        """The whole file as a sequence of zero-copy buffers (header, then each tensor)."""
        yield memoryview(self.header())
        for _key, tensor in self.tensors:
            yield tensor_bytes(tensor)


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int,
                writer: str = "") -> list[ShardPlan]:
    """Split tensors into shards of at most ``max_shard_bytes`` (a bigger tensor alone),
    named for the save ``writer`` (see :func:`member_name`).

    Within a shard, tensors are sorted by element size (descending) so that, with the
    8-byte-padded header, every tensor starts aligned: loads become zero-copy views.
    """
    order = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for key, tensor in order:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((key, tensor))
        used += nbytes
    return [ShardPlan(member_name(f"tensors-{i:05d}.safetensors", writer), items)
            for i, items in enumerate(shards) if items]


def parse_safetensors(buf: memoryview, where: str) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a safetensors file held in ``buf`` (must stay alive).

    As strict as the format: the header is a JSON object of at most
    :data:`~trainguard.checkpoint.schema.MAX_HEADER_BYTES`; each tensor has a known dtype,
    a shape of non-negative ints and ``[start, end]`` offsets spanning exactly its bytes;
    and the tensors tile the data section, no byte shared by two tensors (an overlap
    would let writing one change the other) and none left over (a hole could carry a
    second file format: a polyglot).

    Raises:
        CheckpointCorrupt: the header or offsets do not describe the buffer.
    """
    if len(buf) < 8:
        raise CheckpointCorrupt(f"{where}: not a safetensors file ({len(buf)} bytes)")
    (hlen,) = struct.unpack("<Q", bytes(buf[:8]))
    if hlen > min(len(buf) - 8, MAX_HEADER_BYTES):
        raise CheckpointCorrupt(f"{where}: safetensors header length {hlen} exceeds the file "
                                f"({len(buf)} bytes) or the format's limit")
    header = Fields(load_json(buf[8:8 + hlen], where, "safetensors header", MAX_HEADER_BYTES),
                    where, "header")
    data = buf[8 + hlen:]
    layout = {key: _tensor_layout(header.obj(key), key) for key in header.doc
              if key != "__metadata__"}
    _check_metadata(header)
    _check_tiling(layout, len(data), header)
    whole = torch.frombuffer(data, dtype=torch.uint8) if len(data) else \
        torch.empty(0, dtype=torch.uint8)
    out = {}
    for key, (dtype, shape, start, end) in layout.items():
        if end == start:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        raw = whole[start:end]
        if start % _itemsize(dtype):
            raw = raw.clone()  # torch views need aligned storage offsets
        out[key] = raw.view(dtype).reshape(shape)
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tensor_layout(entry: Fields, key: str) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked."""
    code = entry.str("dtype", max_len=16)
    if code not in _CODES:
        raise entry.bad(f"{key}.dtype", f"must be one of {sorted(_CODES)}", code)
    dtype = _CODES[code]
    shape = [as_int(d, entry, f"{key}.shape[{i}]") for i, d in enumerate(entry.list("shape"))]
    offsets = entry.list("data_offsets")
    if len(offsets) != 2:
        raise entry.bad(f"{key}.data_offsets", "must be [start, end]", offsets)
    start, end = (as_int(o, entry, f"{key}.data_offsets") for o in offsets)
    numel = 1
    for dim in shape:
        numel *= dim
    if end < start or (end - start) != numel * _itemsize(dtype):
        raise CheckpointCorrupt(f"{entry.where}: tensor {key!r}: offsets {start}..{end} do "
                                f"not hold a {code} tensor of shape {shape}")
    return dtype, shape, start, end


def _check_metadata(header: Fields) -> None:
    if "__metadata__" in header.doc:
        metadata = header.obj("__metadata__")
        for name in metadata.doc:
            as_str(metadata.doc[name], metadata, f"__metadata__.{name}")


def _check_tiling(layout: dict, size: int, header: Fields) -> None:
    """The tensors' byte ranges must cover ``[0, size)`` exactly once."""
    covered = 0
    for key, (_, _, start, end) in sorted(layout.items(), key=lambda kv: kv[1][2:]):
        if start != covered:
            what = "overlaps the tensor before it" if start < covered else \
                f"leaves bytes {covered}..{start} that no tensor owns"
            raise CheckpointCorrupt(f"{header.where}: tensor {key!r} at {start}..{end} {what}; "
                                    f"the safetensors format forbids both")
        covered = end
    if covered != size:
        raise CheckpointCorrupt(f"{header.where}: the data section has {size} bytes but its "
                                f"tensors cover {covered}; the format forbids bytes no tensor "
                                f"owns")
