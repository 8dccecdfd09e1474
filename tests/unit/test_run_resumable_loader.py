"""ResumableSampler / ResumableLoader: the data order resumes exactly mid-epoch."""

from __future__ import annotations

import pytest
import torch

from trainguard.errors import StateMismatch
from trainguard.run import ResumableLoader, ResumableSampler


def batches(loader: ResumableLoader, n: int) -> list[list[int]]:
    """The next ``n`` batches, across epoch ends, as lists of sample values."""
    out: list[list[int]] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch.tolist())
            if len(out) == n:
                break
    return out


def dataset(n: int = 10) -> torch.Tensor:
    return torch.arange(n)


def test_epochs_reshuffle_deterministically():
    sampler = ResumableSampler(10, seed=5)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(10)) and first != second
    assert first == ResumableSampler(10, seed=5).order(0).tolist()
    assert first != ResumableSampler(10, seed=6).order(0).tolist()
    assert list(ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]


def test_sampler_resumes_mid_epoch():
    sampler = ResumableSampler(dataset(), seed=1)
    it = iter(sampler)
    seen = [next(it) for _ in range(4)]
    saved = sampler.state_dict()
    assert saved["position"] == 4 and saved["epoch"] == 0
    fresh = ResumableSampler(dataset(), seed=1)
    fresh.load_state_dict(saved)
    assert seen + list(fresh) == sampler.order(0).tolist()
    assert fresh.state_dict()["epoch"] == 1  # the epoch ended: the next one is due


def test_loader_resumed_mid_epoch_sees_the_batches_of_an_uninterrupted_one():
    uninterrupted = batches(ResumableLoader(dataset(10), batch_size=3, seed=2), 9)
    first = ResumableLoader(dataset(10), batch_size=3, seed=2)
    head = batches(first, 5)  # epoch 0 has 4 batches: this is one into epoch 1
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 1)
    second = ResumableLoader(dataset(10), batch_size=3, seed=2)
    second.load_state_dict(state)
    assert head + batches(second, 4) == uninterrupted


def test_a_live_iterator_follows_a_restore():
    loader = ResumableLoader(dataset(12), batch_size=2, seed=0)
    it = iter(loader)
    first = [next(it).tolist() for _ in range(2)]
    saved = loader.state_dict()
    skipped = [next(it).tolist() for _ in range(3)]
    loader.load_state_dict(saved)  # e.g. a rollback
    assert next(it).tolist() == skipped[0]
    assert first != skipped


def test_iterating_never_touches_the_global_rng():
    loader = ResumableLoader(dataset(10), batch_size=3, seed=2)
    before = torch.get_rng_state()
    batches(loader, 6)
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_prefetching_ahead_do_not_move_the_saved_position():
    kwargs = {"batch_size": 2, "seed": 4, "num_workers": 2, "prefetch_factor": 2}
    uninterrupted = batches(ResumableLoader(dataset(16), **kwargs), 6)
    loader = ResumableLoader(dataset(16), **kwargs)
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]  # workers have prefetched further
    assert loader.sampler.position > 3 * 2
    state = loader.state_dict()
    assert state["batch"] == 3
    del it
    resumed = ResumableLoader(dataset(16), **kwargs)
    resumed.load_state_dict(state)
    assert head + batches(resumed, 3) == uninterrupted


def test_a_different_dataset_or_batch_size_is_refused_on_restore():
    state = ResumableLoader(dataset(10), batch_size=3).state_dict()
    with pytest.raises(StateMismatch, match="batch_size=3"):
        ResumableLoader(dataset(10), batch_size=4).load_state_dict(state)
    with pytest.raises(StateMismatch, match="size=10"):
        ResumableSampler(11).load_state_dict(ResumableSampler(10).state_dict())


def test_bad_arguments_name_the_fix():
    with pytest.raises(TypeError, match="shuffle"):
        ResumableLoader(dataset(), shuffle=True, sampler=None)
    with pytest.raises(TypeError, match="sets generator"):
        ResumableLoader(dataset(), generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(dataset(), batch_size=0)
    with pytest.raises(ValueError, match="no batch of 20"):
        ResumableLoader(dataset(), batch_size=20, drop_last=True)
    with pytest.raises(ValueError, match="non-empty"):
        ResumableSampler(0)
    with pytest.raises(TypeError, match="len"):
        ResumableSampler(object())
