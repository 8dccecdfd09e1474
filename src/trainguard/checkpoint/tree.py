"""Turn a training state into (JSON tree, named tensors) and back, without pickle.

A state is a dict whose values may be: objects with ``state_dict``/``load_state_dict``
(modules, optimizers, schedulers, GradScaler, samplers, :class:`RNGState`), tensors, numpy
arrays, and nested dicts/lists/tuples of JSON-able values. Anything else is refused at
save time with the path of the offending value, because a checkpoint that cannot be
loaded without running code (pickle) is not a checkpoint we write.

JSON nodes that are not plain JSON carry a ``"__tg__"`` tag::

    {"__tg__": "tensor", "name": "model/fc.weight", "device": "cuda:0"}
    {"__tg__": "ndarray", "name": "rng/numpy/1", "dtype": "<u4", "shape": [624]}
    {"__tg__": "stateful", "type": "torch.optim.adamw.AdamW", "state": {...}}
    {"__tg__": "tuple", "items": [...]}
    {"__tg__": "dict", "items": [[key, value], ...]}      (non-str keys, e.g. optimizer)
    {"__tg__": "dtype", "name": "float32"}   {"__tg__": "bytes", "hex": "..."}

Restoring writes back *in place*: tensors are ``copy_``'d into the live tensors (same
device and dtype), stateful objects get ``load_state_dict``, dicts and lists are
updated key by key, so the training loop continues without re-creating objects.

A state file is untrusted input: :func:`parse_state_file` and :func:`check_tree` check
every node against the shapes above (tag, field types, dtype names from a fixed table,
device strings, that each tensor named exists and each array fits its bytes) before
anything is decoded, so :func:`decode` and :func:`restore_into` only ever see trees they
can rebuild. A bad tree is :class:`~trainguard.errors.CheckpointCorrupt`: restore skips
the checkpoint like one with a bad checksum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from trainguard.checkpoint.format import check_file_name
from trainguard.checkpoint.schema import (
    MAX_DEPTH,
    MAX_STATE_BYTES,
    Fields,
    as_int,
    check_depth,
    load_json,
)
from trainguard.errors import CheckpointCorrupt, StateMismatch

TAG = "__tg__"
_MISSING = object()
_TAGS = frozenset({"tensor", "ndarray", "tuple", "dict", "dtype", "bytes", "stateful"})

#: Every torch dtype by its name: a state file's dtype tag is resolved here and nowhere
#: else (``getattr(torch, name)`` would hand back ``torch.load`` for ``"load"``).
DTYPES: dict[str, torch.dtype] = {str(v).removeprefix("torch."): v
                                  for v in vars(torch).values() if isinstance(v, torch.dtype)}
# Devices a tensor node may name; "meta" is not one (a meta tensor holds no data).
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|xla|privateuseone)(:[0-9]{1,4})?")
# numpy dtype strings of plain-data arrays (bool, numbers, bytes, str, void, datetimes)
_NP_DTYPE = re.compile(r"[<>|=]?(?:[?biufcSUV][0-9]{0,5}|[Mm]8(?:\[[0-9]*[a-zA-Z]{1,3}\])?)")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def numpy_dtype(text: object) -> np.dtype | None:
    """The numpy dtype of an array node's ``dtype`` string; None unless plain data."""
    if not isinstance(text, str) or not _NP_DTYPE.fullmatch(text):
        return None
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError):
        return None
    return None if dtype.hasobject else dtype


def is_stateful(obj: object) -> bool:
    """Whether ``obj`` exposes ``state_dict()`` and ``load_state_dict()``."""
    return (not isinstance(obj, (dict, torch.Tensor, type))
            and callable(getattr(obj, "state_dict", None))
            and callable(getattr(obj, "load_state_dict", None)))


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "<root>"


class Flattener:
    """Encodes a state; collects its tensors under unique, readable names."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        #: names of tensors made for this save (copies of numpy arrays): no history
        self.fresh: set[str] = set()

    def _name(self, path: tuple) -> str:
        base = _path_str(path)
        name, n = base, 1
        while name in self.tensors:
            name, n = f"{base}#{n}", n + 1
        return name

    def encode(self, value: Any, path: tuple = ()) -> Any:
        """Encode ``value`` found at ``path``; tensors are recorded, not embedded."""
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path)
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and TAG not in value:
                return {k: self.encode(v, path + (k,)) for k, v in value.items()}
            return {TAG: "dict", "items": [[self.encode(k, path + ("key",)),
                                            self.encode(v, path + (k,))]
                                           for k, v in value.items()]}
        if isinstance(value, list):
            return [self.encode(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {TAG: "tuple", "items": [self.encode(v, path + (i,))
                                            for i, v in enumerate(value)]}
        if isinstance(value, torch.dtype):
            name = str(value).removeprefix("torch.")
            if DTYPES.get(name) is not value:
                raise TypeError(f"cannot checkpoint {_path_str(path)!r}: dtype {value} is not "
                                f"one torch exposes by name")
            return {TAG: "dtype", "name": name}
        if isinstance(value, (bytes, bytearray)):
            return {TAG: "bytes", "hex": bytes(value).hex()}
        if is_stateful(value):
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            return {TAG: "stateful", "type": kind,
                    "state": self.encode(value.state_dict(), path)}
        raise TypeError(
            f"cannot checkpoint {_path_str(path)!r} of type {type(value).__name__}: "
            f"use tensors, numpy arrays, JSON-able values, or an object with "
            f"state_dict()/load_state_dict() (pickle is never used)"
        )

    def _tensor(self, tensor: torch.Tensor, path: tuple) -> dict:
        if tensor.is_sparse or tensor.is_quantized or getattr(tensor, "is_nested", False):
            raise TypeError(f"cannot checkpoint {_path_str(path)!r}: sparse, quantized "
                            f"and nested tensors are not supported; convert to dense")
        name = self._name(path)
        self.tensors[name] = tensor.detach()
        return {TAG: "tensor", "name": name, "device": str(tensor.device)}

    def _ndarray(self, array: np.ndarray, path: tuple) -> dict:
        if numpy_dtype(array.dtype.str) != array.dtype:
            raise TypeError(f"cannot checkpoint {_path_str(path)!r}: numpy arrays of dtype "
                            f"{array.dtype} (object or structured) need pickle or lose their "
                            f"fields; convert to a numeric dtype")
        name = self._name(path)
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.tensors[name] = torch.from_numpy(raw.copy())
        self.fresh.add(name)
        return {TAG: "ndarray", "name": name, "dtype": array.dtype.str,
                "shape": list(array.shape)}


def flatten(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Encode a state dict into a JSON tree plus its tensors.

    Raises:
        TypeError: ``state`` is not a dict, or holds a value that needs pickle.
    """
    tree, tensors, _fresh = flatten_with_fresh(state)
    return tree, tensors


def flatten_with_fresh(state: dict) -> tuple[dict, dict[str, torch.Tensor], frozenset[str]]:
    """:func:`flatten`, plus the names of tensors created for this save (no history)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of named objects, got {type(state).__name__}")
    flattener = Flattener()
    tree = flattener.encode(state)
    try:
        check_depth(tree, "state", "the state tree")
    except CheckpointCorrupt:  # restore would refuse it: never write it
        raise ValueError(f"the state is nested deeper than {MAX_DEPTH} levels; flatten it "
                         f"(restore refuses deeper state files)") from None
    return tree, flattener.tensors, frozenset(flattener.fresh)


def _device_of(node: dict) -> torch.device:
    """The recorded device if this machine has it, else the CPU (or the current GPU)."""
    device = torch.device(node["device"])  # checked against _DEVICE: it parses
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return torch.device("cuda")
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    return device if callable(available) and available() else torch.device("cpu")


def decode(node: Any, tensors: dict[str, torch.Tensor], clone: bool = True) -> Any:
    """Rebuild the plain value of an encoded node (tensors on their recorded device)."""
    if isinstance(node, list):
        return [decode(v, tensors, clone) for v in node]
    if not isinstance(node, dict):
        return node
    tag = node.get(TAG)
    if tag is None:
        return {k: decode(v, tensors, clone) for k, v in node.items()}
    if tag == "tensor":
        tensor = _tensor(node, tensors)
        device = _device_of(node)
        if device.type != "cpu":
            return tensor.to(device)
        return tensor.clone() if clone else tensor
    if tag == "ndarray":
        raw = _tensor(node, tensors).numpy()
        return raw.view(np.dtype(node["dtype"])).reshape(node["shape"]).copy()
    if tag == "tuple":
        return tuple(decode(v, tensors, clone) for v in node["items"])
    if tag == "dict":
        return {_hashable(decode(k, tensors, clone)): decode(v, tensors, clone)
                for k, v in node["items"]}
    if tag == "dtype":
        return DTYPES[node["name"]]
    if tag == "bytes":
        return bytes.fromhex(node["hex"])
    if tag == "stateful":
        return decode(node["state"], tensors, clone)
    raise StateMismatch(f"unknown node tag {tag!r} in state.json: written by a newer trainguard?")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _tensor(node: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    try:
        return tensors[node["name"]]
    except KeyError:
        raise StateMismatch(f"state.json refers to tensor {node.get('name')!r}, "
                            f"which no shard of the checkpoint holds") from None


def restore_into(target: Any, node: Any, tensors: dict[str, torch.Tensor],
                 path: tuple = ()) -> Any:
    """Write an encoded node back into ``target`` in place where possible.

    Returns:
        The object that should now stand at ``path`` (``target`` itself when updated
        in place, else a freshly decoded value).

    Raises:
        StateMismatch: a tensor's shape or dtype differs from the live tensor's.
    """
    tag = node.get(TAG) if isinstance(node, dict) else None
    if tag == "stateful" and is_stateful(target):
        in_place = isinstance(target, torch.nn.Module)  # modules copy_ into parameters
        state = decode(node["state"], tensors, clone=not in_place)
        if not (in_place and _adopt(target, state)):
            target.load_state_dict(state)
        return target
    if tag == "tensor" and isinstance(target, torch.Tensor):
        source = _tensor(node, tensors)
        if source.shape != target.shape or source.dtype != target.dtype:
            raise StateMismatch(
                f"{_path_str(path)!r}: checkpoint holds {source.dtype} {tuple(source.shape)}, "
                f"live tensor is {target.dtype} {tuple(target.shape)}; restore into a state "
                f"built the same way as the one saved"
            )
        with torch.no_grad():
            target.copy_(source)
        return target
    if tag is None and isinstance(node, dict) and isinstance(target, dict):
        for key, child in node.items():
            target[key] = restore_into(target.get(key, _MISSING), child, tensors, path + (key,))
        return target
    if isinstance(node, list) and isinstance(target, list) and len(node) == len(target):
        for i, child in enumerate(node):
            target[i] = restore_into(target[i], child, tensors, path + (i,))
        return target
    return decode(node, tensors)


def _adopt(module: torch.nn.Module, state: dict) -> bool:
    """Give a CPU module's parameters and buffers the restored (already verified) memory
    instead of copying into it: the same Parameter objects, new storage. Saves a full
    copy of the model on restore. Only when it is plainly safe; False -> copy instead.

    Not for: tensors off the CPU, tied or otherwise storage-sharing tensors (adopting
    would untie them), DDP-wrapped modules (their hooks know the old storage), any key,
    shape or dtype that does not match exactly.
    """
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return False
    live = module.state_dict(keep_vars=True)
    if set(live) != set(state):
        return False
    spans = []
    for name, tensor in live.items():
        source = state[name]
        if (not isinstance(tensor, torch.Tensor) or not isinstance(source, torch.Tensor)
                or tensor.device.type != "cpu" or source.device.type != "cpu"
                or type(tensor) not in (torch.Tensor, torch.nn.Parameter)
                or tensor.shape != source.shape or tensor.dtype != source.dtype
                or not tensor.is_contiguous()):
            return False
        if tensor.numel():
            spans.append((tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes))
    spans.sort()
    if any(end > start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)):
        return False  # two entries overlap in memory (tied weights, views)
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.data = state[name]
    return True


# -- reading an untrusted state file -----------------------------------------------------

#: name -> (dtype, shape) of each tensor a state file may refer to
TensorLayout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def parse_state_file(raw: bytes | memoryview, where: str) -> tuple[dict, dict]:
    """The tree and tensor references of a state file, checked in structure.

    Returns:
        ``(tree, tensor_refs)``: the top-level dict, and tensor name -> ``(step, file,
        name)`` of tensors kept in an earlier checkpoint's file (incremental saves).

    Raises:
        CheckpointCorrupt: not JSON, too big or deep, or not a state file's shape. Call
            :func:`check_tree` once the tensors are known.
    """
    doc = Fields(load_json(raw, where, "state file", MAX_STATE_BYTES), where)
    tree = doc.get("tree")
    if not isinstance(tree, dict):
        raise doc.bad("tree", "must be a JSON object (the saved state dict)", tree)
    refs = {}
    for name, ref in doc.obj("tensor_refs", {}).doc.items():
        field = f"tensor_refs[{name!r}]"
        if not isinstance(ref, list) or len(ref) != 3:
            raise doc.bad(field, "must be [step, file, tensor name]", ref)
        if not isinstance(ref[2], str):
            raise doc.bad(f"{field}[2]", "must be a tensor name", ref[2])
        refs[name] = (as_int(ref[0], doc, f"{field}[0]"), check_file_name(ref[1]), ref[2])
    return tree, refs


def check_tree(tree: dict, where: str, tensors: TensorLayout) -> None:
    """Check every node of a state tree, so that decoding it cannot fail.

    Walked without recursion; the depth is bounded by the parser already.

    Args:
        tree: the ``tree`` of :func:`parse_state_file`.
        where: the state file, for messages.
        tensors: every tensor the checkpoint holds, by name.

    Raises:
        CheckpointCorrupt: a node is malformed, names a missing tensor or an unknown dtype
            or device, or an array does not fit its bytes (the path of the node is named).
    """
    stack: list[tuple[Any, str, bool]] = [(tree, "", False)]
    while stack:
        node, path, as_key = stack.pop()
        if node is None or isinstance(node, (bool, int, float, str)):
            continue
        if isinstance(node, list) and not as_key:
            stack.extend((v, f"{path}/{i}", False) for i, v in enumerate(node))
        elif isinstance(node, dict) and TAG not in node and not as_key:
            stack.extend((v, f"{path}/{k}", False) for k, v in node.items())
        elif isinstance(node, dict) and TAG in node:
            stack.extend(_check_tagged(Fields(node, where, path or "/"), tensors, as_key))
        else:  # a list or untagged dict as a key (JSON holds nothing else)
            raise Fields({}, where).bad(path or "/", "must be a hashable key (a number, "
                                        "string or tuple)", node)


def _check_tagged(node: Fields, tensors: TensorLayout, as_key: bool) -> list:
    """Check one tagged node; returns its children to check, as (node, path, as_key)."""
    tag = node.doc[TAG]
    if not isinstance(tag, str) or tag not in _TAGS:
        raise node.bad(f"{node.path}.{TAG}", f"must be one of {sorted(_TAGS)}", tag)
    if as_key and tag not in ("tuple", "dtype", "bytes"):
        raise node.bad(node.path, "must be a hashable key (a number, string or tuple)", tag)
    if tag in ("tensor", "ndarray"):
        _check_tensor_node(node, tag, tensors)
    elif tag == "dtype" and node.str("name", max_len=64) not in DTYPES:
        raise node.bad(f"{node.path}.name", "must name a torch dtype", node.get("name"))
    elif tag == "bytes":
        node.str("hex", _HEX, max_len=MAX_STATE_BYTES)
    elif tag == "stateful":
        node.str("type", max_len=1000)
        if "state" not in node.doc:
            raise CheckpointCorrupt(f"{node.where}: malformed: {node.path}.state is missing")
        return [(node.doc["state"], node.path, False)]
    elif tag == "tuple":
        return [(v, f"{node.path}/{i}", as_key) for i, v in enumerate(node.list("items"))]
    elif tag == "dict":
        children = []
        for i, pair in enumerate(node.list("items")):
            if not isinstance(pair, list) or len(pair) != 2:
                raise node.bad(f"{node.path}.items[{i}]", "must be [key, value]", pair)
            children += [(pair[0], f"{node.path}/key{i}", True),
                         (pair[1], f"{node.path}/{i}", False)]
        return children
    return []


def _check_tensor_node(node: Fields, tag: str, tensors: TensorLayout) -> None:
    name = node.str("name", max_len=10_000)
    if name not in tensors:
        raise CheckpointCorrupt(f"{node.where}: {node.path} refers to tensor {name!r}, which "
                                f"no shard of the checkpoint holds")
    if tag == "tensor":
        device = node.str("device", max_len=32)
        if not _DEVICE.fullmatch(device):
            raise node.bad(f"{node.path}.device", "must be a device such as 'cpu' or "
                           "'cuda:0'", device)
        return
    dtype = numpy_dtype(node.get("dtype"))
    if dtype is None:
        raise node.bad(f"{node.path}.dtype", "must be a plain-data numpy dtype (never "
                       "object)", node.get("dtype"))
    shape = [as_int(d, node, f"{node.path}.shape[{i}]") for i, d in
             enumerate(node.list("shape"))]
    count = int(np.prod(shape, dtype=object)) if shape else 1
    stored_dtype, stored_shape = tensors[name]
    if stored_dtype != torch.uint8 or stored_shape != (count * dtype.itemsize,):
        raise CheckpointCorrupt(f"{node.where}: {node.path}: an array of {dtype} {shape} does "
                                f"not fit tensor {name!r} ({stored_dtype} "
                                f"{tuple(stored_shape)})")
