"""The training-loop guard: ``Run`` and what it is made of.

``Run`` resumes, saves on a cadence, handles preemption and errors, writes heartbeats
and metrics, and guards against non-finite losses, OOM and bad data. ``ResumableLoader``
(or a tracked plain ``DataLoader``) makes the data position part of the checkpoint;
``run.epochs()`` / ``run.batches()`` resume epoch loops mid-epoch. See docs/run.md.
"""

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

# Loaded on first use (PEP 562): the launcher reads EXIT_RESUME and heartbeats without
# torch; Run and the data/guard helpers import it.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "trainguard.errors": ("EXIT_RESUME", "DataCheckFailed", "NonFiniteLoss", "Preempted"),
    "trainguard.run.config": ("RunConfig",),
    "trainguard.run.resumable_loader": ("ResumableLoader", "ResumableSampler"),
    "trainguard.run.guards": ("DataCheck", "MicroBatcher", "expect_all", "expect_any",
                              "expect_mean"),
    "trainguard.run.heartbeat": ("HEARTBEAT_FILE", "HeartbeatRecord", "read_heartbeat"),
    "trainguard.run.metrics": ("METRICS_FILE",),
    "trainguard.run.run": ("Phase", "Run"),
})

if TYPE_CHECKING:
    from trainguard.errors import EXIT_RESUME, DataCheckFailed, NonFiniteLoss, Preempted
    from trainguard.run.config import RunConfig
    from trainguard.run.guards import DataCheck, MicroBatcher, expect_all, expect_any, expect_mean
    from trainguard.run.heartbeat import HEARTBEAT_FILE, HeartbeatRecord, read_heartbeat
    from trainguard.run.metrics import METRICS_FILE
    from trainguard.run.resumable_loader import ResumableLoader, ResumableSampler
    from trainguard.run.run import Phase, Run

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
