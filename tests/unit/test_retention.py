"""Retention policies as pure functions over checkpoint records (fake clock, no disk)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from trainguard import keep_any, keep_best, keep_every, keep_last, keep_newer_than


@dataclass
class C:
    step: int
    created_at: float = 0.0
    metrics: dict = field(default_factory=dict)
    reason: str = "periodic"


def test_keep_last():
    cps = [C(s) for s in (1, 2, 3, 4)]
    assert keep_last(2)(cps) == {3, 4}
    assert keep_last(10)(cps) == {1, 2, 3, 4}


def test_keep_best_min_max_and_exclusions():
    cps = [C(1, metrics={"l": 0.5}), C(2, metrics={"l": 0.1}), C(3, metrics={"l": 0.05},
           reason="error"), C(4, metrics={"l": float("nan")}), C(5), C(6, metrics={"l": 0.9})]
    assert keep_best(1, "l", "min")(cps) == {2}  # step 3 saved on error never counts
    assert keep_best(2, "l", "max")(cps) == {6, 1}


def test_keep_best_ties_prefer_newer():
    assert keep_best(1, "l")([C(1, metrics={"l": 1.0}), C(2, metrics={"l": 1.0})]) == {2}


def test_keep_every_and_newer_than_with_fake_clock():
    cps = [C(s, created_at=100.0 * s) for s in range(1, 7)]
    assert keep_every(3)(cps) == {3, 6}
    assert keep_newer_than(250, clock=lambda: 600.0)(cps) == {4, 5, 6}


def test_composition_is_union_and_flattens():
    policy = keep_last(1) | keep_every(2) | keep_last(2)
    assert isinstance(policy, keep_any) and len(policy.policies) == 3
    assert policy([C(s) for s in range(1, 6)]) == {2, 4, 5}


@pytest.mark.parametrize("bad", [lambda: keep_last(0), lambda: keep_best(0, "m"),
                                 lambda: keep_best(1, "m", "median"), lambda: keep_every(0),
                                 lambda: keep_newer_than(-1), lambda: keep_best(1, "")])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        bad()
