"""DataLoaderPosition: a plain DataLoader resumed mid-epoch by sampler indices only."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from trainguard.errors import StateMismatch
from trainguard.run.loaders import DataLoaderPosition


class Counting(Dataset):
    """Sample i is [i, noise]; the noise is an augmentation from torch, python and numpy
    RNGs. ``loaded`` records every index read."""

    def __init__(self, n: int = 23) -> None:
        self.n = n
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded.append(i)
        noise = torch.rand(()).item() + random.random() + float(np.random.rand())
        return torch.tensor([float(i), noise])


def take(position: DataLoaderPosition, n: int) -> list[list[list[float]]]:
    """The next ``n`` batches, across epoch ends."""
    out: list = []
    while len(out) < n:
        for batch in position:
            out.append(batch.tolist())
            if len(out) == n:
                break
    return out


def reseed(seed: int = 0) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


LOADERS = {
    "shuffle": {"batch_size": 4, "shuffle": True},
    "shuffle-drop-last": {"batch_size": 4, "shuffle": True, "drop_last": True},
    "in-order": {"batch_size": 5},
    "unbatched": {"batch_size": None, "shuffle": True},
    "own-generator": {"batch_size": 4, "shuffle": True,
                      "generator": torch.Generator().manual_seed(7)},
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_resumed_mid_epoch_it_yields_what_an_uninterrupted_loader_does(kind):
    options = dict(LOADERS[kind])
    if "generator" in options:
        options["generator"] = torch.Generator().manual_seed(7)
    reseed()
    uninterrupted = take(DataLoaderPosition(DataLoader(Counting(), **options)), 14)

    reseed()
    if "generator" in options:
        options["generator"] = torch.Generator().manual_seed(7)
    first = DataLoaderPosition(DataLoader(Counting(), **options))
    head = take(first, 8)  # into the second epoch for every kind here
    state, rng = first.state_dict(), torch.get_rng_state()
    py_rng, np_rng = random.getstate(), np.random.get_state()

    reseed(99)  # a fresh process: other streams, a fresh sampler generator
    if "generator" in options:
        options["generator"] = torch.Generator().manual_seed(1234)
    dataset = Counting()
    second = DataLoaderPosition(DataLoader(dataset, **options))
    second.load_state_dict(state)
    torch.set_rng_state(rng)  # what the Run restores before the next batch
    random.setstate(py_rng)
    np.random.set_state(np_rng)
    assert head + take(second, 6) == uninterrupted


def test_skipping_reads_no_sample_of_the_consumed_batches():
    reseed()
    first = DataLoaderPosition(DataLoader(Counting(100), batch_size=10, shuffle=True))
    take(first, 7)
    dataset = Counting(100)
    second = DataLoaderPosition(DataLoader(dataset, batch_size=10, shuffle=True))
    second.load_state_dict(first.state_dict())
    batch = next(iter(second))
    assert len(dataset.loaded) == 10  # the 8th batch only, not 70 samples first
    assert sorted(dataset.loaded) == sorted(int(v) for v in batch[:, 0].tolist())


def test_workers_augment_the_same_after_a_resume_and_prefetching_does_not_count():
    options = {"batch_size": 3, "shuffle": True, "num_workers": 2, "drop_last": True}
    reseed()
    uninterrupted = take(DataLoaderPosition(DataLoader(Counting(), **options)), 10)
    reseed()
    first = DataLoaderPosition(DataLoader(Counting(), **options))
    it = iter(first)
    head = [next(it).tolist() for _ in range(4)]  # workers have prefetched further
    state, rng = first.state_dict(), torch.get_rng_state()
    assert state["batch"] == 4
    del it
    reseed(5)  # the worker streams must not depend on the main process's
    second = DataLoaderPosition(DataLoader(Counting(), **options))
    second.load_state_dict(state)
    torch.set_rng_state(rng)  # what the Run restores: the next epoch's seed comes from it
    assert head + take(second, 6) == uninterrupted


def test_the_users_loader_is_left_alone_and_len_is_its_len():
    loader = DataLoader(Counting(), batch_size=4, shuffle=True)
    position = DataLoaderPosition(loader)
    take(position, 3)
    assert len(position) == len(loader) == 6
    assert loader.batch_size == 4 and position.loader is loader


def test_a_changed_dataset_is_refused_on_resume():
    first = DataLoaderPosition(DataLoader(Counting(23), batch_size=4, shuffle=True))
    take(first, 2)
    second = DataLoaderPosition(DataLoader(Counting(40), batch_size=4, shuffle=True))
    second.load_state_dict(first.state_dict())
    with pytest.raises(StateMismatch, match="6 batches, this loader makes 10"):
        next(iter(second))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10).split(1))


def test_an_iterable_dataset_is_replayed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="trainguard.run"):
        first = DataLoaderPosition(DataLoader(Stream(), batch_size=None), name="stream")
    assert "IterableDataset" in caplog.text and "track(stream=" in caplog.text
    head = take(first, 3)
    second = DataLoaderPosition(DataLoader(Stream(), batch_size=None))
    second.load_state_dict(first.state_dict())
    assert head + take(second, 2) == [[i] for i in range(5)]
