"""``RunConfig``: every option of :class:`~trainguard.run.Run`, validated in one place.

``Run(path, save_every_steps=100, ...)`` builds a ``RunConfig`` from its keyword
arguments, so a typo or a bad value fails at construction, before any GPU time, with a
message naming the option and the fix.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from trainguard.checkpoint import RetentionPolicy
from trainguard.errors import EXIT_RESUME as EXIT_RESUME  # re-exported: defined with the codes

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _check_int(name: str, value: Any, minimum: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        hint = " (or None to disable)" if none_ok else ""
        raise ValueError(f"{name} must be an int >= {minimum}{hint}, got {value!r}")


def _check_seconds(name: str, value: Any, none_ok: bool = False, zero_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= 0 if zero_ok else value > 0))
    if not ok:
        hint = " (or None to disable)" if none_ok else ""
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}{hint}, "
                         f"got {value!r}")


def _as_signals(value: Any) -> tuple[signal.Signals, ...]:
    if isinstance(value, (int, str)):
        value = (value,)
    out = []
    for item in value:
        try:
            sig = signal.Signals[item] if isinstance(item, str) else signal.Signals(item)
        except (KeyError, ValueError):
            raise ValueError(f"preempt_signals: {item!r} is not a signal; use e.g. "
                             f"(signal.SIGTERM, signal.SIGINT) or ('SIGTERM', 'SIGUSR1')") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"preempt_signals: {sig.name} cannot be caught by any process")
        out.append(sig)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class RunConfig:
    """Options of a :class:`~trainguard.run.Run` (all keyword arguments of ``Run``).

    Attributes:
        save_every_steps: save and commit every N completed steps (None: no step cadence).
        save_every_seconds: save and commit when this many seconds passed since the last
            commit (None: no time cadence). At least one cadence must be set: a run that
            commits only at the end loses everything on a crash.
        keep: retention policy applied after each commit (None keeps every checkpoint).
        resume: restore the newest valid checkpoint on ``track()``; False starts fresh
            and refuses a run directory that already holds checkpoints.
        log_every_steps: write one metrics line every N steps (and at the last step).
        heartbeat_seconds: how often the background thread rewrites ``heartbeat.json``.
        progress_every_seconds: how often a progress line is logged while a
            ``run.phase(...)`` other than training runs, or while no progress is made.
        preempt_signals: signals that mean "save and exit with EXIT_RESUME".
        preempt_deadline: seconds from the signal by which the save should be committed;
            passing it is logged as an error (the platform's kill usually follows).
        exit_on_preempt: raise :class:`~trainguard.run.Preempted` (a ``SystemExit`` with
            ``EXIT_RESUME``) after the preemption save; False only ends ``run.steps()``.
        nonfinite_metric: logged value that triggers a rollback when NaN/inf (None: off).
        max_rollbacks: rollbacks allowed per run before failing with ``NonFiniteLoss``.
        data_checks: checks over the first batches (``expect_any``, ``expect_all``,
            ``expect_mean``) that stop a run on bad data.
        tensorboard: write TensorBoard events (None: when ``tensorboard`` is installed).
        wandb: log to Weights & Biases; a dict is passed to ``wandb.init`` (None: when
            ``wandb`` is installed and ``WANDB_PROJECT`` is set).
        capture_rng: save and restore the python/numpy/torch/CUDA RNG streams.
        mirror: a second, remote tier (``"s3://bucket/runs/x"``): each committed
            checkpoint is uploaded in the background; resume takes the newest of both.
        data_gate: a :class:`~trainguard.data_manifest.DataGate` checked when the Run opens,
            before any step: empty, stale or failing data stops the run at once.
    """

    save_every_steps: int | None = None
    save_every_seconds: float | None = 600.0
    keep: RetentionPolicy | None = None
    resume: bool = True
    log_every_steps: int = 10
    heartbeat_seconds: float = 10.0
    progress_every_seconds: float = 30.0
    preempt_signals: tuple = DEFAULT_SIGNALS
    preempt_deadline: float = 25.0
    exit_on_preempt: bool = True
    nonfinite_metric: str | None = "loss"
    max_rollbacks: int = 3
    data_checks: tuple = ()
    tensorboard: bool | None = None
    wandb: bool | Mapping | None = None
    capture_rng: bool = True
    mirror: Any = None
    data_gate: Any = None

    def __post_init__(self) -> None:
        _check_int("save_every_steps", self.save_every_steps, 1, none_ok=True)
        _check_seconds("save_every_seconds", self.save_every_seconds, none_ok=True)
        if self.save_every_steps is None and self.save_every_seconds is None:
            raise ValueError(
                "set save_every_steps and/or save_every_seconds: a run that commits only "
                "at the end loses all its progress on a crash or preemption"
            )
        if self.keep is not None and not callable(self.keep):
            raise TypeError(f"keep must be a retention policy such as keep_last(3), "
                            f"got {self.keep!r}")
        _check_int("log_every_steps", self.log_every_steps, 1)
        _check_seconds("heartbeat_seconds", self.heartbeat_seconds)
        _check_seconds("progress_every_seconds", self.progress_every_seconds)
        _check_seconds("preempt_deadline", self.preempt_deadline)
        _check_int("max_rollbacks", self.max_rollbacks, 0)
        object.__setattr__(self, "preempt_signals", _as_signals(self.preempt_signals))
        if self.nonfinite_metric is not None and not (
                isinstance(self.nonfinite_metric, str) and self.nonfinite_metric):
            raise ValueError(f"nonfinite_metric must be a metric name such as 'loss', or "
                             f"None to disable the guard, got {self.nonfinite_metric!r}")
        checks = tuple(self.data_checks)
        for check in checks:
            if not callable(getattr(check, "update", None)):
                raise TypeError(f"data_checks: {check!r} is not a data check; build one "
                                f"with expect_any(...), expect_all(...) or expect_mean(...)")
        object.__setattr__(self, "data_checks", checks)
        for name in ("resume", "exit_on_preempt", "capture_rng"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.tensorboard not in (None, True, False):
            raise TypeError(f"tensorboard must be True, False or None (when installed), "
                            f"got {self.tensorboard!r}")
        if self.data_gate is not None and not callable(getattr(self.data_gate, "check", None)):
            raise TypeError(f"data_gate must be a trainguard.DataGate, got "
                            f"{self.data_gate!r}")
        if not (self.wandb is None or isinstance(self.wandb, (bool, Mapping))):
            raise TypeError(f"wandb must be True, False, None or a dict of wandb.init "
                            f"arguments, got {self.wandb!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RunConfig:
        """Build a config from ``Run``'s keyword arguments, naming any unknown one.

        Raises:
            TypeError: an option that ``Run`` does not have (with the valid names).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Run() got unknown option(s) {', '.join(unknown)}; valid "
                            f"options: {', '.join(sorted(known))}")
        return cls(**options)
