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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainguard.errors import StateMismatch

TAG = "__tg__"
_MISSING = object()


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
            return {TAG: "dtype", "name": str(value).removeprefix("torch.")}
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
        if array.dtype.hasobject:
            raise TypeError(f"cannot checkpoint {_path_str(path)!r}: numpy object arrays "
                            f"need pickle; convert to a numeric dtype")
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
    return flattener.encode(state), flattener.tensors, frozenset(flattener.fresh)


def _device_of(node: dict) -> torch.device:
    device = torch.device(node.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


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
        return getattr(torch, node["name"])
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
    if any(end > start for (_, end), (start, _) in zip(spans, spans[1:])):
        return False  # two entries overlap in memory (tied weights, views)
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.data = state[name]
    return True
