"""Guards that turn slow disasters into early, clear stops or quiet recoveries.

* Data checks: predicates over the first batches of an attempt (``expect_any``,
  ``expect_all``, ``expect_mean``); a failing one raises :class:`DataCheckFailed` before
  hours are spent training on an empty or wrong data set. They compose as a list::

      Run(..., data_checks=[expect_mean(lambda b: (b[1] == 1).float().mean(), above=0.0,
                                        within=50, name="positive fraction")])

* Non-finite loss: the Run rolls back to the last good checkpoint and skips the batch
  (see ``Run``); after ``max_rollbacks`` it raises :class:`NonFiniteLoss`.
* CUDA out of memory (opt-in, ``run.accumulate``): :class:`MicroBatcher` frees memory,
  halves the micro-batch and keeps the effective batch with gradient accumulation.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trainguard.errors import DataCheckFailed
from trainguard.errors import NonFiniteLoss as NonFiniteLoss  # re-exported (it was defined here)

log = logging.getLogger("trainguard.run")


# -- data checks -------------------------------------------------------------------------


def _value(result: Any) -> float:
    if isinstance(result, torch.Tensor):
        if result.numel() != 1:
            raise TypeError(f"a data check returned a tensor of shape {tuple(result.shape)}; "
                            f"return one number or bool per batch")
        return float(result.detach().item())
    if isinstance(result, (bool, int, float)):
        return float(result)
    raise TypeError(f"a data check must return a bool or a number, got "
                    f"{type(result).__name__}")


class DataCheck:
    """A check over the first ``within`` batches of an attempt (base of the three kinds).

    Args:
        fn: called with each batch; returns a bool or a number.
        within: how many batches are checked.
        name: what the check means, for the failure message.
    """

    kind = "check"

    def __init__(self, fn: Callable[[Any], Any], within: int = 50, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"{self.kind}(fn, ...) needs a callable taking a batch, got {fn!r}")
        if not isinstance(within, int) or isinstance(within, bool) or within < 1:
            raise ValueError(f"{self.kind}(..., within=N) needs N >= 1 batches, got {within!r}")
        self.fn = fn
        self.within = within
        self.name = name or getattr(fn, "__name__", None) or repr(fn)
        self.seen = 0
        self.done = False

    def fresh(self) -> DataCheck:
        """A copy with nothing seen (each attempt checks its own first batches)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.seen, clone.done = 0, False
        clone._reset()
        return clone

    def update(self, batch: Any) -> None:
        """Look at one batch.

        Raises:
            DataCheckFailed: the check failed (at once for ``expect_all``, after
                ``within`` batches for the others).
        """
        if self.done:
            return
        self.seen += 1
        self._observe(_value(self.fn(batch)))
        if self.seen >= self.within:
            self.finish()

    def finish(self) -> None:
        """Conclude over the batches seen so far (the run ended before ``within``)."""
        if not self.done and self.seen:
            self.done = True
            self._conclude()

    def _fail(self, detail: str) -> DataCheckFailed:
        self.done = True
        return DataCheckFailed(
            f"data check {self.name!r} failed: {detail} (checked the first {self.seen} "
            f"batch(es) of this attempt). The run stopped before training on bad data; check "
            f"the data source (an empty or stale manifest, a wrong filter or label mapping)"
        )

    def _reset(self) -> None:
        pass

    def _observe(self, value: float) -> None:
        raise NotImplementedError

    def _conclude(self) -> None:
        pass


class expect_any(DataCheck):
    """Fails when ``fn`` is false for every one of the first ``within`` batches
    (e.g. "some batch within 50 has a positive label")."""

    kind = "expect_any"

    def __init__(self, fn, within: int = 50, name: str | None = None) -> None:
        super().__init__(fn, within, name)
        self._reset()

    def _reset(self) -> None:
        self.hit = False

    def _observe(self, value: float) -> None:
        self.hit = self.hit or bool(value)
        if self.hit:
            self.done = True  # satisfied: nothing more to check

    def _conclude(self) -> None:
        if not self.hit:
            raise self._fail(f"false for all of the first {self.seen} batches")


class expect_all(DataCheck):
    """Fails at the first of the first ``within`` batches for which ``fn`` is false."""

    kind = "expect_all"

    def _observe(self, value: float) -> None:
        if not value:
            raise self._fail(f"false for batch {self.seen}")


class expect_mean(DataCheck):
    """Fails when the mean of ``fn`` over the first ``within`` batches is not strictly
    between ``above`` and ``below`` (e.g. positive fraction above 0.0).

    Args:
        fn: a number per batch.
        above: the mean must be greater than this (None: no lower bound).
        below: the mean must be less than this (None: no upper bound).
        within: how many batches are averaged.
        name: what the check means.
    """

    kind = "expect_mean"

    def __init__(self, fn, *, above: float | None = None, below: float | None = None,
                 within: int = 50, name: str | None = None) -> None:
        if above is None and below is None:
            raise ValueError("expect_mean needs above= and/or below=, e.g. above=0.0")
        super().__init__(fn, within, name)
        self.above, self.below = above, below
        self._reset()

    def _reset(self) -> None:
        self.total = 0.0

    def _observe(self, value: float) -> None:
        self.total += value

    def _conclude(self) -> None:
        mean = self.total / self.seen
        low_ok = self.above is None or mean > self.above
        high_ok = self.below is None or mean < self.below
        if not (low_ok and high_ok and math.isfinite(mean)):
            bounds = " and ".join(b for b in (
                f"> {self.above}" if self.above is not None else "",
                f"< {self.below}" if self.below is not None else "") if b)
            raise self._fail(f"mean {mean:.6g}, expected {bounds}")


# -- CUDA out of memory ------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA's, or an allocator RuntimeError)."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom_type) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def batch_length(batch: Any) -> int:
    """Length along dim 0 shared by every tensor in ``batch``.

    Raises:
        TypeError: the batch holds no tensor.
        ValueError: its tensors disagree on dim 0.
    """
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    if not sizes:
        raise TypeError(f"cannot split a batch of type {type(batch).__name__}: accumulate() "
                        f"needs a tensor, or tuples/lists/dicts of tensors")
    if len(sizes) > 1:
        raise ValueError(f"batch tensors disagree on their first dimension {sorted(sizes)}; "
                         f"every tensor must have one row per sample")
    return sizes.pop()


def _tensors(batch: Any):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``batch``; other values are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch


class MicroBatcher:
    """Forward+backward over a batch in micro-batches, halving them on out-of-memory.

    The gradient of the whole batch is the weighted sum of the micro-batch gradients
    (weights: micro-batch size / batch size), so the effective batch never changes, only
    how many pieces it is computed in. The micro-batch size is part of the Run's
    checkpoint, so a resumed run does not hit the same OOM first.

    Args:
        on_change: called with ``(old, new, batch_size)`` after each halving.
    """

    def __init__(self, on_change: Callable[[int, int, int], None] | None = None) -> None:
        self.micro_batch: int | None = None  # None: the whole batch at once
        self._on_change = on_change

    def run(self, batch: Any, fn: Callable[[Any], torch.Tensor], *,
            backward: Callable[[torch.Tensor], None] | None = None,
            zero_grad: Callable[[], None] | None = None,
            optimizers: list[torch.optim.Optimizer] = ()) -> torch.Tensor:
        """Accumulate gradients of ``fn`` over ``batch``; returns the batch's mean loss.

        Args:
            batch: tensors with one row per sample (see :func:`slice_batch`).
            fn: forward of one micro-batch, returning its mean loss.
            backward: backpropagates a loss (default ``loss.backward()``).
            zero_grad: clears gradients after an OOM (default: ``optimizers``').
            optimizers: whose gradients ``zero_grad`` clears by default.

        Raises:
            ValueError: neither ``zero_grad`` nor ``optimizers`` given.
            Exception: whatever ``fn`` raises that is not an OOM, and an OOM that a
                micro-batch of one sample still hits.
        """
        if zero_grad is None:
            if not optimizers:
                raise ValueError("accumulate() zeroes gradients after an OOM: track an "
                                 "optimizer or pass zero_grad=")

            def zero_grad() -> None:
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
        backward = backward or (lambda loss: loss.backward())
        n = batch_length(batch)
        while True:
            size = min(self.micro_batch or n, n)
            try:
                return self._accumulate(batch, n, size, fn, backward)
            except Exception as exc:
                if not is_oom(exc) or size == 1:
                    raise
            # Left the except block: the traceback and the tensors its frames hold are
            # released, so the memory can really be freed before the retry.
            zero_grad()
            free_memory()
            new = max(1, size // 2)
            self.micro_batch = new
            if self._on_change is not None:
                self._on_change(size, new, n)

    @staticmethod
    def _accumulate(batch, n, size, fn, backward) -> torch.Tensor:
        total: torch.Tensor | None = None
        for start in range(0, n, size):
            stop = min(n, start + size)
            loss = fn(slice_batch(batch, start, stop))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("the function given to accumulate() must return the mean loss "
                                "of its micro-batch as a one-element tensor")
            weight = (stop - start) / n
            backward(loss * weight)
            part = loss.detach() * weight
            total = part if total is None else total + part
        assert total is not None
        return total

    def state_dict(self) -> dict:
        return {"micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batch = state.get("micro_batch")
