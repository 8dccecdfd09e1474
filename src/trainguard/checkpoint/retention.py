"""Retention policies: which committed checkpoints to keep.

A policy is a small callable ``policy(checkpoints) -> set of steps to keep`` over the
valid checkpoints (oldest first). Policies compose with ``|`` (keep what either keeps)::

    keep_last(3) | keep_best(1, "val_loss", "min") | keep_every(10_000)

Whatever the policy says, the manager never deletes the newest valid checkpoint nor one
being written; that invariant lives in the manager, not in each policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class _Checkpoint(Protocol):
    step: int
    created_at: float
    metrics: dict
    reason: str


class RetentionPolicy:
    """Base of every policy; subclasses implement :meth:`keep`."""

    def keep(self, checkpoints: Sequence[_Checkpoint]) -> set[int]:
        """Steps to keep among ``checkpoints`` (sorted by step, oldest first)."""
        raise NotImplementedError

    def __call__(self, checkpoints: Sequence[_Checkpoint]) -> set[int]:
        return self.keep(checkpoints)

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return keep_any(self, other)


@dataclass(frozen=True)
class keep_any(RetentionPolicy):
    """Keep what any of ``policies`` keeps (what ``a | b`` builds)."""

    policies: tuple

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list = []
        for policy in policies:
            flat.extend(policy.policies if isinstance(policy, keep_any) else [policy])
        object.__setattr__(self, "policies", tuple(flat))

    def keep(self, checkpoints):
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints)
        return kept

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.policies)


@dataclass(frozen=True)
class keep_last(RetentionPolicy):
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"keep_last(n) needs n >= 1, got {self.n!r}")

    def keep(self, checkpoints):
        return {c.step for c in list(checkpoints)[-self.n:]}


@dataclass(frozen=True)
class keep_best(RetentionPolicy):
    """Keep the ``k`` best checkpoints by ``metric`` (``mode`` "min" or "max").

    Checkpoints without the metric, with a non-finite value, or saved because of an error
    (``reason == "error"``) are never "best".
    """

    k: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"keep_best(k, ...) needs k >= 1, got {self.k!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"keep_best mode must be 'min' or 'max', got {self.mode!r}")
        if not self.metric:
            raise ValueError("keep_best needs a metric name, e.g. keep_best(1, 'val_loss')")

    def keep(self, checkpoints):
        scored = []
        for c in checkpoints:
            value = c.metrics.get(self.metric)
            if (c.reason == "error" or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                continue
            scored.append((value if self.mode == "min" else -value, -c.step, c.step))
        return {step for _score, _neg, step in sorted(scored)[: self.k]}


@dataclass(frozen=True)
class keep_every(RetentionPolicy):
    """Keep every checkpoint whose step is a multiple of ``steps``."""

    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"keep_every(steps) needs steps >= 1, got {self.steps!r}")

    def keep(self, checkpoints):
        return {c.step for c in checkpoints if c.step % self.steps == 0}


@dataclass(frozen=True)
class keep_newer_than(RetentionPolicy):
    """Keep checkpoints created less than ``seconds`` ago (``clock`` is injectable)."""

    seconds: float
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, (int, float)) or self.seconds < 0:
            raise ValueError(f"keep_newer_than(seconds) needs seconds >= 0, got {self.seconds!r}")

    def keep(self, checkpoints):
        now = self.clock()
        return {c.step for c in checkpoints if now - c.created_at < self.seconds}
