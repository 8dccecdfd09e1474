"""A plain ``DataLoader``'s position, checkpointed and resumed by sampler indices.

``run.track(data=loader)`` with an ordinary ``torch.utils.data.DataLoader`` (shuffle or
not, any ``num_workers``, ``drop_last`` either way, any sampler) puts a
:class:`DataLoaderPosition` in the checkpointed state. Iterated by the Run
(``run.batches(loader)`` or ``run.steps(N, data=loader)``), it yields the batches the
loader would yield, and a resumed run continues at the batch after the last completed
step, bit for bit, without loading the batches before it:

* at the start of each epoch one seed is drawn from the global torch RNG (the same one
  draw a ``DataLoader(shuffle=True)`` makes); the epoch's batches of indices are the
  loader's own sampler run under that seed (python, numpy and torch RNGs seeded, then
  put back), so a mid-epoch resume rebuilds them from the checkpointed seed and skips
  the consumed ones: indices only, no sample is read;
* a sampler with its own ``generator`` (or a stateful sampler) has its state recorded at
  the epoch start and set back before the indices are rebuilt;
* worker processes (``num_workers > 0``) reseed python, numpy and torch before each
  batch from ``(epoch seed, batch number)``, so random augmentation in ``__getitem__``
  does not depend on which batches a worker handled before; with ``num_workers=0`` it
  draws from the main process's RNG, which the Run restores.

The loader object itself is never modified: the batches come from an internal
``DataLoader`` over the same dataset with the same settings (``collate_fn``,
``pin_memory``, workers...), built once, so persistent workers stay persistent. An
``IterableDataset`` has no indices to skip by: its consumed batches are read again and
dropped, which is exact only when the stream is deterministic (a warning says so at
``track()``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from trainguard.checkpoint.tree import is_stateful
from trainguard.errors import StateMismatch
from trainguard.run.resumable_loader import mix_seed

log = logging.getLogger("trainguard.run")


def is_plain_loader(obj: Any) -> bool:
    """A ``DataLoader`` that keeps no position of its own (no ``state_dict``)."""
    return isinstance(obj, DataLoader) and not is_stateful(obj)


class _Tagged(NamedTuple):
    """What the internal loader's sampler yields: the loader's own index (a list for
    batched loaders) and the seed its worker uses for that batch."""

    index: Any
    seed: int


def _identity(batch: Any) -> Any:
    return batch


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.manual_seed(seed)


class _SeededFetch(torch.utils.data.Dataset):
    """Does, in the worker, what DataLoader's fetcher does for one batch, after seeding
    the worker's RNGs for that batch."""

    def __init__(self, dataset: Any, batched: bool, collate_fn: Any) -> None:
        self.dataset = dataset
        self.batched = batched
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: _Tagged) -> Any:
        if get_worker_info() is not None:  # the main process's RNG is the Run's to restore
            _reseed(item.seed)
        if not self.batched:
            return self.collate_fn(self.dataset[item.index])
        many = getattr(self.dataset, "__getitems__", None)
        data = many(list(item.index)) if many else [self.dataset[i] for i in item.index]
        return self.collate_fn(data)


class _Schedule(Sampler):
    """The rest of the current epoch, as tagged indices (mutable: one internal loader
    serves every epoch)."""

    def __init__(self) -> None:
        self.items: list = []
        self.start = 0
        self.seed = 0

    def __len__(self) -> int:
        return max(0, len(self.items) - self.start)

    def __iter__(self) -> Iterator[_Tagged]:
        for i in range(self.start, len(self.items)):
            yield _Tagged(self.items[i], mix_seed(self.seed, i))


class _Seeded:
    """Runs a block with python/numpy/CPU-torch RNGs seeded, then puts them back."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed & 0xFFFF_FFFF)
        torch.default_generator.manual_seed(self.seed)  # not torch.manual_seed: CUDA too

    def __exit__(self, *exc: object) -> None:
        python, numpy, cpu = self._saved
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)


class DataLoaderPosition:
    """Where a plain ``DataLoader`` is in its epoch; iterating yields the rest of it.

    Args:
        loader: the user's DataLoader (never modified).
        name: its name in ``run.track`` (for messages).

    Attributes:
        epoch: epochs finished through this position.
        batch: batches of the current epoch handed out.
        seed: the current epoch's seed (None before it starts).
    """

    def __init__(self, loader: DataLoader, name: str = "data") -> None:
        self.loader = loader
        self.name = name
        self.iterable = isinstance(loader.dataset, IterableDataset)
        self.epoch = 0
        self.batch = 0
        self.seed: int | None = None
        self._sampler_states: list | None = None
        self._items: list | None = None
        self._expected: int | None = None  # batches of the restored epoch (a check)
        self._generation = 0
        self._generator = torch.Generator()  # worker base seeds: never the global RNG
        self._schedule = _Schedule()
        self._internal: DataLoader | None = None
        if self.iterable:
            log.warning("run.track(%s=...): its dataset is an IterableDataset, which has no "
                        "indices to resume by: a resumed run reads the consumed batches of "
                        "the epoch again and drops them, exact only if the stream is "
                        "deterministic. For exact, cheap resume give the dataset "
                        "state_dict()/load_state_dict() and use torchdata's "
                        "StatefulDataLoader", name)

    def __len__(self) -> int:
        """Batches per epoch (the loader's ``len``)."""
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return _PositionIterator(self)

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"epoch", "batch", "seed", "samplers", "batches"}``."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "samplers": self._sampler_states,
                "batches": None if self._items is None else len(self._items)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (the next iteration starts there)."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.seed = None if state.get("seed") is None else int(state["seed"])
        self._sampler_states = state.get("samplers")
        self._expected = state.get("batches")
        self._items = None
        self._generation += 1

    # -- iteration -----------------------------------------------------------------------

    def _start(self) -> Iterator[Any]:
        """An iterator over the rest of the current epoch (starting one if none is)."""
        if self.seed is None:  # a fresh epoch: the one draw a shuffling DataLoader makes
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self._sampler_states = self._capture_samplers()
            self._items, self._expected = None, None
        self._generator.manual_seed(mix_seed(self.seed, self.batch))
        if self.iterable:
            inner = iter(self._loader())
            for _ in range(self.batch):  # no index to skip by: read and drop
                next(inner)
            return inner
        if self._items is None:
            self._items = self._materialize()
        if self._expected is not None and self._expected != len(self._items):
            raise StateMismatch(
                f"run.track({self.name}=...): the checkpoint's epoch has {self._expected} "
                f"batches, this loader makes {len(self._items)}; the dataset, batch size or "
                f"sampler changed. Use the same ones, or start a fresh run directory")
        self._schedule.items, self._schedule.start = self._items, self.batch
        self._schedule.seed = self.seed
        return iter(self._loader())

    def _finish_epoch(self) -> None:
        self.epoch, self.batch, self.seed = self.epoch + 1, 0, None
        self._items = self._expected = None

    def _randomness(self) -> list:
        """The loader's samplers (the batch sampler, then the sampler)."""
        return [s for s in (self.loader.batch_sampler, self.loader.sampler) if s is not None]

    def _capture_samplers(self) -> list:
        states = []
        for sampler in self._randomness():
            generator = getattr(sampler, "generator", None)
            if is_stateful(sampler):
                states.append(sampler.state_dict())
            elif isinstance(generator, torch.Generator):
                states.append(generator.get_state())
            else:
                states.append(None)
        return states

    def _materialize(self) -> list:
        """The epoch's indices, from its seed and its samplers' state at its start."""
        samplers = self._randomness()
        # No states recorded (None) means nothing to set back: zip stops at the shorter.
        for sampler, state in zip(samplers, self._sampler_states or [], strict=False):
            if state is None:
                continue
            if is_stateful(sampler):
                sampler.load_state_dict(state)
            else:
                sampler.generator.set_state(state)
        assert self.seed is not None
        with _Seeded(self.seed):
            return list(samplers[0])

    def _loader(self) -> DataLoader:
        if self._internal is None:
            self._internal = _internal_loader(self.loader, self._schedule, self._generator,
                                              self.iterable)
        return self._internal


def _internal_loader(loader: DataLoader, schedule: _Schedule, generator: torch.Generator,
                     iterable: bool) -> DataLoader:
    """A DataLoader with ``loader``'s settings whose indices come from ``schedule``."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
        "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context, "generator": generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if iterable:
        return DataLoader(loader.dataset, batch_size=loader.batch_size,
                          drop_last=loader.drop_last, collate_fn=loader.collate_fn, **options)
    fetch = _SeededFetch(loader.dataset, loader.batch_sampler is not None, loader.collate_fn)
    return DataLoader(fetch, batch_size=None, sampler=schedule, collate_fn=_identity,
                      **options)


class _PositionIterator:
    """One epoch (the rest of it) of a DataLoaderPosition; counts what it hands out and
    follows a restore (``load_state_dict``) made while it is alive."""

    def __init__(self, owner: DataLoaderPosition) -> None:
        self._owner = owner
        self._generation = owner._generation
        self._inner = owner._start()
        self._finished = False

    def __iter__(self) -> _PositionIterator:
        return self

    def __next__(self) -> Any:
        owner = self._owner
        if self._generation != owner._generation:  # restored since: start from there
            self._generation, self._finished = owner._generation, False
            self._inner = owner._start()
        if self._finished:
            raise StopIteration
        try:
            batch = next(self._inner)
        except StopIteration:
            self._finished = True
            owner._finish_epoch()
            raise
        owner.batch += 1  # counted when handed to the loop: what a checkpoint records
        return batch
