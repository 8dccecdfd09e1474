"""Data order that resumes mid-epoch: ``ResumableSampler`` and ``ResumableLoader``.

A torch ``DataLoader`` with ``shuffle=True`` keeps no state: its shuffle comes from the
global RNG (or a generator) at ``iter()`` time and its position lives in a live iterator,
so a resumed run either repeats the start of the epoch or sees another order. Here the
order of epoch ``e`` is a pure function of ``(seed, e)``, and the position is a counter
in ``state_dict()``; track the object with ``run.track(data=loader)`` and a resumed run
sees exactly the batches an uninterrupted one would have seen next.

Which one to use:

* ``ResumableLoader(dataset, batch_size, ...)`` (recommended): builds the DataLoader and
  counts the batches *consumed*, so it is exact with worker processes too (workers
  prefetch ahead of what the loop has used).
* ``ResumableSampler(dataset)`` in your own ``DataLoader(..., sampler=...)``: counts the
  indices *handed out*, which equals what was consumed only with ``num_workers=0``.

Neither draws from the global RNG (a plain DataLoader draws a worker seed from it at each
``iter()``, which alone would make a resumed run's dropout masks differ).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from trainguard.errors import StateMismatch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _size_of(data_source: Sized | int) -> int:
    if isinstance(data_source, int) and not isinstance(data_source, bool):
        size = data_source
    else:
        try:
            size = len(data_source)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"ResumableSampler needs a dataset with len() or its size as an "
                            f"int, got {type(data_source).__name__}") from None
    if size < 1:
        raise ValueError(f"ResumableSampler needs a non-empty dataset, got size {size}")
    return size


def _check_same(kind: str, saved: dict, live: dict) -> None:
    for key, value in live.items():
        if key in saved and saved[key] != value:
            raise StateMismatch(
                f"{kind}: the checkpoint was made with {key}={saved[key]!r}, this run has "
                f"{key}={value!r}; resuming would not continue the same data order. Use the "
                f"same {key}, or start a fresh run directory"
            )


class ResumableSampler(Sampler[int]):
    """Dataset indices, reshuffled each epoch, resumable mid-epoch.

    Args:
        data_source: the dataset (anything with ``len()``) or its size.
        shuffle: a new permutation each epoch; False: ``0..n-1`` in order.
        seed: the permutation of epoch ``e`` depends on ``(seed, e)`` only.

    Attributes:
        epoch: the current epoch (0-based).
        position: indices of this epoch already handed out.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.size = _size_of(data_source)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._generation = 0  # bumped by load_state_dict: live iterators then restart

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int) -> torch.Tensor:
        """The index order of ``epoch`` (int64 tensor)."""
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (the ``DistributedSampler`` convention)."""
        self.epoch, self.position = epoch, 0
        self._generation += 1

    def __iter__(self) -> Iterator[int]:
        # Restored at the end of an epoch (position == size), this yields nothing and
        # then moves to the next epoch: what the interrupted loop's next call would have
        # seen. Code that re-creates its iterator at StopIteration (and draws a worker
        # seed from the global RNG then) does so at the same step as an uninterrupted run.
        generation, epoch = self._generation, self.epoch
        order = self.order(epoch).tolist()
        while self.position < self.size:
            if self._generation != generation:  # restored under us: follow the new state
                return
            index = order[self.position]
            self.position += 1
            yield index
        if self._generation == generation and self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "shuffle", "size"}``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Raises:
            StateMismatch: the dataset size, seed or shuffle differ from the saved ones.
        """
        _check_same("ResumableSampler", state,
                    {"size": self.size, "seed": self.seed, "shuffle": self.shuffle})
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._generation += 1


class ResumableLoader:
    """A ``DataLoader`` whose position (epoch, batches consumed) is checkpointable.

    Iterating yields the batches of the current epoch from the current position, like a
    ``DataLoader`` does for a whole epoch; the next ``iter()`` starts the next epoch. After
    ``load_state_dict`` even an iterator created before it continues from the restored
    position.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (order depends on ``(seed, epoch)`` only).
        seed: the shuffle seed.
        drop_last: drop the last incomplete batch of each epoch.
        **loader_kwargs: passed to ``DataLoader`` (``num_workers``, ``collate_fn``,
            ``pin_memory``...); ``sampler``, ``batch_sampler``, ``shuffle`` and
            ``generator`` are set by this class.

    Note:
        Random augmentation inside worker processes is seeded from the position where an
        iteration starts; for bit-exact resume with random augmentation in workers, seed
        it from the sample index instead (or use ``num_workers=0``, where augmentation
        draws from the global RNG that the Run restores).
    """

    def __init__(self, dataset: Any, batch_size: int = 1, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, **loader_kwargs: Any) -> None:
        taken = sorted({"sampler", "batch_sampler", "shuffle", "generator"} & set(loader_kwargs))
        if taken:
            raise TypeError(f"ResumableLoader sets {', '.join(taken)} itself (that is how it "
                            f"can resume); pass shuffle= and seed= instead")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
        self._generator = torch.Generator()  # worker base seeds: never the global RNG
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 drop_last=drop_last, generator=self._generator,
                                 **loader_kwargs)
        if len(self.loader) == 0:
            raise ValueError(f"ResumableLoader: {len(dataset)} samples make no batch of "
                             f"{batch_size} with drop_last=True")
        self.epoch = 0
        self.batch = 0  # batches of this epoch already consumed
        self._generation = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return _ResumingIterator(self)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.batch = epoch, 0
        self._generation += 1

    def _start_inner(self) -> Iterator[Any]:
        if self.batch >= len(self.loader):  # finished, but the next epoch was not asked for
            self.epoch, self.batch = self.epoch + 1, 0
        self.sampler.epoch = self.epoch
        self.sampler.position = self.batch * self.batch_size
        self._generator.manual_seed(mix_seed(self.sampler.seed, self.epoch, self.batch))
        return iter(self.loader)

    def state_dict(self) -> dict:
        """``{"epoch", "batch", "batch_size", "seed", "shuffle", "size"}``."""
        return {"epoch": self.epoch, "batch": self.batch, "batch_size": self.batch_size,
                "seed": self.sampler.seed, "shuffle": self.sampler.shuffle,
                "size": self.sampler.size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Raises:
            StateMismatch: dataset size, batch size, seed or shuffle differ from the saved.
        """
        _check_same("ResumableLoader", state,
                    {"size": self.sampler.size, "batch_size": self.batch_size,
                     "seed": self.sampler.seed, "shuffle": self.sampler.shuffle})
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._generation += 1


class _ResumingIterator:
    """One epoch of a ResumableLoader; restarts from the owner's state after a restore."""

    def __init__(self, owner: ResumableLoader) -> None:
        self._owner = owner
        self._inner: Iterator[Any] | None = None
        self._generation = -1
        self._epoch = -1
        self._finished = False

    def __iter__(self) -> _ResumingIterator:
        return self

    def __next__(self) -> Any:
        owner = self._owner
        if self._generation != owner._generation:  # first call, or restored since
            self._inner = owner._start_inner()
            self._generation, self._epoch = owner._generation, owner.epoch
            self._finished = False
        if self._finished or self._inner is None:
            raise StopIteration
        try:
            batch = next(self._inner)
        except StopIteration:
            self._finished = True
            if owner.epoch == self._epoch:
                owner.epoch, owner.batch = owner.epoch + 1, 0
            raise
        owner.batch += 1  # counted when handed to the loop: what a checkpoint must record
        return batch
