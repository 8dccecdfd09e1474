"""Metrics and log lines: one structured line per log interval, to every sink at once.

Each line carries the step, the mean of every value logged since the previous line, the
speed (steps/s, samples/s), the ETA and, with CUDA, GPU memory. Sinks:

* stderr: a human line through the ``trainguard.run`` logger (flushed per line);
* ``RUN/metrics.jsonl``: one JSON object per line, flushed per line, fsync'd before
  every checkpoint commit (so the metrics of a committed step are as durable as it is);
* TensorBoard (``RUN/tensorboard/``) when ``tensorboard`` is installed;
* Weights & Biases when ``wandb`` is installed and configured.

``metrics.jsonl`` also holds event lines (resume, commit, rollback, oom, preempted, error,
end), told apart by their ``"event"`` key. The field names are listed in docs/run.md.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from trainguard._units import human_duration

log = logging.getLogger("trainguard.run")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"
#: Field names of a metrics line that ``run.log`` may not use for a value.
RESERVED = frozenset({"time", "event", "step", "total", "phase", "steps_per_s",
                      "samples_per_s", "eta_s", "gpu_mem_allocated", "gpu_mem_reserved",
                      "gpu_mem_peak"})


def show_logs() -> Callable[[], None]:
    """Make trainguard's INFO lines visible on stderr unless the application configured
    logging itself; returns the function that undoes it.

    The handler flushes every record (lines appear at once, also through a pipe), and the
    ``trainguard`` logger is set to INFO only when its level was never set.
    """
    logger = logging.getLogger("trainguard")
    handler = None
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[trainguard] %(message)s"))
        logger.addHandler(handler)
    set_level = logger.level == logging.NOTSET
    if set_level:
        logger.setLevel(logging.INFO)

    def undo() -> None:
        if handler is not None:
            logger.removeHandler(handler)
        if set_level:
            logger.setLevel(logging.NOTSET)
    return undo


def to_number(name: str, value: Any) -> float:
    """A logged value as a float: numbers, numpy scalars and one-element tensors.

    Raises:
        TypeError: anything else (naming the metric).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}; log "
                            f"a scalar (e.g. loss.mean())")
        return float(value.detach().item())  # one device sync, as for any printed loss
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} must be a number or a one-element tensor, got "
                        f"{type(value).__name__}")
    return float(value)


def fmt_number(value: float | None) -> str:
    """Short human form of a metric value."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def fmt_rate(value: float) -> str:
    """``1234.5`` -> ``1234``; ``12.34`` -> ``12.3``; ``0.1234`` -> ``0.12``."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def gpu_memory() -> dict[str, int]:
    """Allocated/reserved/peak bytes on the current CUDA device ({} without CUDA)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"gpu_mem_allocated": torch.cuda.memory_allocated(),
            "gpu_mem_reserved": torch.cuda.memory_reserved(),
            "gpu_mem_peak": torch.cuda.max_memory_allocated()}


class Sink(Protocol):
    """Where metric lines go besides stderr and metrics.jsonl."""

    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """TensorBoard event files under ``log_dir``.

    ``purge_step`` discards events at or after that step left by an attempt that died
    after its last commit, so a resumed run's curves do not double back.
    """

    def __init__(self, log_dir: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run that every attempt of this run directory logs into.

    The W&B run id is kept in ``RUN/wandb-run-id`` so a resumed attempt continues the
    same W&B run (``resume="allow"``) instead of starting a new one.
    """

    def __init__(self, module: Any, run_dir: Path, init_kwargs: Mapping) -> None:
        id_file = run_dir / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(8)
            id_file.write_text(run_id)
        kwargs = {"id": run_id, "resume": "allow", "dir": str(run_dir), **init_kwargs}
        self.module = module
        self.run = module.init(**kwargs)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.module.log(scalars, step=step)

    def close(self) -> None:
        finish = getattr(self.run, "finish", None) or self.module.finish
        finish()


def open_sinks(run_dir: Path, tensorboard: bool | None, wandb: bool | Mapping | None,
               purge_step: int) -> list[Sink]:
    """The optional sinks the configuration asks for (see ``RunConfig``).

    Raises:
        ImportError: a sink was asked for explicitly (True) but is not installed.
    """
    sinks: list[Sink] = []
    if tensorboard is not False:
        if importlib.util.find_spec("tensorboard") is not None:
            sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, purge_step))
        elif tensorboard:
            raise ImportError("tensorboard=True but the tensorboard package is not installed; "
                              "pip install 'trainguard[tensorboard]' (or tensorboard=None)")
    use_wandb = wandb if wandb is not None else bool(os.environ.get("WANDB_PROJECT"))
    if use_wandb:
        try:
            import wandb as wandb_module
        except ImportError:
            if wandb is None:
                return sinks  # WANDB_PROJECT set but wandb absent: not configured here
            raise ImportError("wandb logging was asked for but the wandb package is not "
                              "installed; pip install 'trainguard[wandb]'") from None
        sinks.append(WandbSink(wandb_module, run_dir,
                               wandb if isinstance(wandb, Mapping) else {}))
    return sinks


class MetricsLogger:
    """Aggregates logged values into lines and writes them to every sink.

    Args:
        run_dir: where ``metrics.jsonl`` lives.
        sinks: extra sinks (TensorBoard, W&B).
        clock: monotonic clock for rates (injectable for tests).
        wall_clock: Unix-time clock for the ``time`` field.
    """

    def __init__(self, run_dir: Path, sinks: list[Sink] | None = None, *,
                 clock=time.monotonic, wall_clock=time.time) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self.sinks = list(sinks or [])
        self._clock = clock
        self._wall = wall_clock
        self.total: int | None = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._start = (0, self._clock(), 0)  # (step, time, samples) of the window start

    def begin(self, step: int, total: int | None, samples: int = 0) -> None:
        """Start a new window at ``step`` (at the loop start and after a rollback, whose
        rolled-back values must not reach the next line)."""
        self.total = total
        self._start = (step, self._clock(), samples)
        self._sums.clear()
        self._counts.clear()

    def add(self, values: dict[str, float]) -> None:
        """Add already-converted values to the current window."""
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def line(self, step: int, samples: int = 0) -> dict:
        """Write one line for ``step`` with the window's means; returns the record."""
        now = self._clock()
        step0, time0, samples0 = self._start
        elapsed = now - time0
        means = {k: self._sums[k] / self._counts[k] for k in self._sums}
        steps_per_s = (step - step0) / elapsed if elapsed > 0 and step > step0 else None
        samples_per_s = ((samples - samples0) / elapsed
                         if elapsed > 0 and samples > samples0 else None)
        eta = ((self.total - step) / steps_per_s
               if steps_per_s and self.total is not None else None)
        record = {"time": round(self._wall(), 3), "step": step, "total": self.total, **means,
                  "steps_per_s": steps_per_s, "samples_per_s": samples_per_s, "eta_s": eta,
                  **gpu_memory()}
        self._write(record)
        log.info("%s", self.human(record))
        scalars = {k: v for k, v in record.items()
                   if k not in ("time", "step", "total") and isinstance(v, (int, float))}
        for sink in list(self.sinks):
            try:
                sink.write(step, scalars)
            except Exception as exc:  # an optional sink must not stop training
                log.warning("metrics sink %s failed (%s); dropping it", type(sink).__name__, exc)
                self.sinks.remove(sink)
        self._sums.clear()
        self._counts.clear()
        self._start = (step, now, samples)
        return record

    def human(self, record: dict) -> str:
        """The stderr form of a line."""
        total = record.get("total")
        head = f"step {record['step']}" + (f"/{total}" if total else "")
        parts = [head]
        for name, value in record.items():
            if name in RESERVED:
                continue
            parts.append(f"{name} {fmt_number(value)}")
        if record.get("steps_per_s") is not None:
            parts.append(f"{fmt_rate(record['steps_per_s'])} steps/s")
        if record.get("samples_per_s") is not None:
            parts.append(f"{fmt_rate(record['samples_per_s'])} samples/s")
        if record.get("eta_s") is not None:
            parts.append(f"eta {human_duration(record['eta_s'])}")
        if "gpu_mem_allocated" in record:
            gib = 1 << 30
            parts.append(f"gpu {record['gpu_mem_allocated'] / gib:.2f}/"
                         f"{record['gpu_mem_reserved'] / gib:.2f} GiB")
        return "  ".join(parts)

    def event(self, event: str, step: int, **fields: Any) -> None:
        """Write an event line (``{"event": ..., "step": ..., ...}``) to metrics.jsonl."""
        self._write({"time": round(self._wall(), 3), "event": event, "step": step, **fields})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(_json_safe(record)) + "\n")  # line-buffered: flushed

    def sync(self) -> None:
        """Flush and fsync metrics.jsonl (called before every commit)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close every sink; a failing sink is logged, not raised."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing metrics sink %s failed: %s", type(sink).__name__, exc)
        self.sinks = []
        if not self._file.closed:
            self.sync()
            self._file.close()


def _json_safe(record: dict) -> dict:
    """NaN and inf are not JSON: they are written as strings ("nan", "inf")."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}
