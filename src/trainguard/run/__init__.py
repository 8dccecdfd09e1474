"""The training-loop guard: ``Run`` and what it is made of.

``Run`` resumes, saves on a cadence, handles preemption and errors, writes heartbeats
and metrics, and guards against non-finite losses, OOM and bad data. ``ResumableLoader``
(or a tracked plain ``DataLoader``) makes the data position part of the checkpoint;
``run.epochs()`` / ``run.batches()`` resume epoch loops mid-epoch. See docs/run.md.
"""

from trainguard.run.config import EXIT_RESUME, RunConfig
from trainguard.run.data import ResumableLoader, ResumableSampler
from trainguard.run.guards import (
    DataCheck,
    DataCheckFailed,
    MicroBatcher,
    NonFiniteLoss,
    expect_all,
    expect_any,
    expect_mean,
)
from trainguard.run.heartbeat import HEARTBEAT_FILE, HeartbeatRecord, read_heartbeat
from trainguard.run.metrics import METRICS_FILE
from trainguard.run.run import Phase, Run
from trainguard.run.signals import Preempted

__all__ = [
    "EXIT_RESUME",
    "HEARTBEAT_FILE",
    "METRICS_FILE",
    "DataCheck",
    "DataCheckFailed",
    "HeartbeatRecord",
    "MicroBatcher",
    "NonFiniteLoss",
    "Phase",
    "Preempted",
    "ResumableLoader",
    "ResumableSampler",
    "Run",
    "RunConfig",
    "expect_all",
    "expect_any",
    "expect_mean",
    "read_heartbeat",
]
