"""What a Run checkpoints: the tracked objects plus the Run's own entry.

The state saved at every commit is ``{**tracked, "trainguard": {"run": counters,
"epoch": position, "micro_batch": ..., "rng": DeferredRNG()}}``. Everything in it is
restored *in place*, so the training script keeps using the same objects after a resume
or a rollback. Two kinds of objects are tracked through an adapter that stands in the
state for them:

* a plain ``DataLoader`` -> :class:`~trainguard.run.loaders.DataLoaderPosition` (its
  position, resumed by sampler indices);
* a simple object (``argparse.Namespace``, ``types.SimpleNamespace``, a small config
  class) -> :class:`Attributes` (its attributes, set back with ``setattr``).

The RNG streams are the exception to "restored in place at once": a restore only
*stages* them, and the Run applies them where the first resumed step starts, so what a
script does between ``track()`` and its loop (``iter(loader)`` draws a seed from the
global torch RNG) cannot shift them.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from trainguard.checkpoint import RNGState
from trainguard.checkpoint.tree import is_stateful
from trainguard.run.loaders import DataLoaderPosition, is_plain_loader

#: Key of the Run's own entry in the checkpointed state.
RUN_KEY = "trainguard"

# Attribute values an Attributes adapter saves: what reads back as the same value.
_PLAIN = (type(None), bool, int, float, str, torch.Tensor)
# Attribute values that are code, not state (argparse's set_defaults(func=...)): left out.
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)


class RunCounters:
    """The Run's own checkpointed counters.

    Attributes:
        step: completed steps.
        samples: samples trained on (for samples/s across attempts).
        rollbacks: non-finite rollbacks so far (bounded by ``max_rollbacks``).
        skip_steps: steps whose batch is skipped (their loss was non-finite).
    """

    def __init__(self) -> None:
        self.step = 0
        self.samples = 0
        self.rollbacks = 0
        self.skip_steps: list[int] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples, "rollbacks": self.rollbacks,
                "skip_steps": list(self.skip_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self.samples = int(state.get("samples", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skip_steps = [int(s) for s in state.get("skip_steps", [])]


class DeferredRNG:
    """The global RNG streams (python, numpy, torch, CUDA), restored when asked.

    ``state_dict()`` captures the streams as they are (or, while a restored state waits
    to be applied, that state: a save in between must not record the unrestored
    streams). ``load_state_dict()`` only stages the state; :meth:`apply` sets it.
    """

    def __init__(self) -> None:
        self._streams = RNGState()
        self._pending: dict | None = None

    @property
    def pending(self) -> bool:
        """Whether a restored state waits to be applied."""
        return self._pending is not None

    def state_dict(self) -> dict:
        return self._pending if self._pending is not None else self._streams.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def apply(self) -> None:
        """Set the streams to the staged state, if any (once)."""
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._streams.load_state_dict(state)


class Attributes:
    """The attributes of a simple object, checkpointed and set back in place.

    ``run.track(args=args)`` wraps ``args`` (an ``argparse.Namespace``...) in one, so
    ``args.lr /= 4`` is saved with every checkpoint and a resumed run finds ``args.lr``
    as it was, without renaming anything. Attributes hold plain values (None, bool, int,
    float, str, tensors, and lists/tuples/dicts of those); one added after ``track()``
    is saved from then on. Functions and classes (``set_defaults(func=...)``) are code,
    not state: they are left out.

    Only what the run *changed* is set back: an attribute whose saved value equals the
    value it had when that run called ``track()`` keeps this process's value, so a
    resumed ``--epochs 20`` extends a run started with ``--epochs 10`` while the
    annealed ``args.lr`` is restored.

    Args:
        target: the object whose attributes are saved.
        name: its name in ``run.track`` (for messages).

    Raises:
        TypeError: an attribute holds something that cannot be saved as a value.
    """

    def __init__(self, target: Any, name: str) -> None:
        self.target = target
        self.name = name
        self._initial = self._values()  # refuses a non-plain attribute now, not at a save

    def _values(self) -> dict:
        values = {k: v for k, v in vars(self.target).items() if not isinstance(v, _CODE)}
        for attr, value in values.items():
            if not _plain(value):
                raise TypeError(
                    f"run.track({self.name}=...): attribute {attr!r} holds a "
                    f"{type(value).__name__}, which is not a plain value; track it by "
                    f"itself (run.track({attr}={self.name}.{attr})) or delete the attribute")
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}

    def state_dict(self) -> dict:
        """``{"values": the attributes now, "initial": the attributes at track()}``."""
        return {"values": self._values(), "initial": self._initial}

    def load_state_dict(self, state: dict) -> None:
        initial = state.get("initial", {})
        for attr, value in state["values"].items():
            if attr not in initial or not _same(value, initial[attr]):
                setattr(self.target, attr, value)
                if attr in initial:  # changed since that run's start: stays "changed"
                    self._initial[attr] = initial[attr]

    def __repr__(self) -> str:
        return f"Attributes({self.target!r})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class GeneratorState:
    """A ``torch.Generator`` of the script's own, checkpointed (``get_state``/``set_state``).

    Args:
        generator: the generator, restored in place.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"].cpu())


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _simple_object(obj: Any) -> bool:
    """An object whose state is its attributes (no state_dict, not a tensor or module)."""
    return (hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module))
            and not callable(obj) and not hasattr(obj, "__iter__"))


def build_state(objects: dict[str, Any], own: dict[str, Any], capture_rng: bool) -> dict:
    """The dict a Run saves: ``objects`` (plain DataLoaders and simple objects through
    their adapters) plus its own entry (and the RNG streams, as a :class:`DeferredRNG`).

    Raises:
        TypeError: no objects, or one that cannot be restored in place (a bare int...).
        ValueError: an object named like the Run's own entry.
    """
    if not objects:
        raise TypeError("run.track() needs the objects to checkpoint, e.g. "
                        "run.track(model=model, optimizer=optimizer)")
    state: dict[str, Any] = {}
    for name, obj in objects.items():
        if name == RUN_KEY:
            raise ValueError(f"run.track({RUN_KEY}=...): that name is the Run's own; pick "
                             f"another")
        if is_stateful(obj) or isinstance(obj, (torch.Tensor, dict, list)):
            state[name] = obj
        elif isinstance(obj, torch.Generator):
            state[name] = GeneratorState(obj)
        elif is_plain_loader(obj):
            state[name] = DataLoaderPosition(obj, name)
        elif _simple_object(obj):
            state[name] = Attributes(obj, name)
        else:
            raise TypeError(
                f"run.track({name}=...): a {type(obj).__name__} cannot be restored in place; "
                f"track an object with state_dict()/load_state_dict(), a tensor, a dict, a "
                f"DataLoader or an object holding plain attributes (argparse.Namespace): "
                f"e.g. run.track(args=args) and use args.{name}")
    own = dict(own)
    if capture_rng:
        own["rng"] = DeferredRNG()
    return {**state, RUN_KEY: own}
