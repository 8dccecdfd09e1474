"""trainguard: training runs that never lose progress.

Durable, verified, fast checkpoints on a local directory (the embedded default) or an
object store, a guard around the training loop (``Run``), jobs that survive their
launcher (``trainguard run``), and data gates that stop doomed runs before they start.
"""

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports
from trainguard._version import __version__

# Each name loads on first use (PEP 562): `import trainguard` and the CLI's job commands
# need no torch. The TYPE_CHECKING imports say the same for type checkers and readers;
# tests/unit/test_public_api.py checks that both agree.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "trainguard.checkpoint": ("CheckpointInfo", "CheckpointManager", "RetentionPolicy",
                              "RNGState", "SaveHandle", "keep_any", "keep_best", "keep_every",
                              "keep_last", "keep_newer_than"),
    "trainguard.data_manifest": ("DataGate",),
    "trainguard.errors": ("EXIT_RESUME", "CheckpointCorrupt", "CheckpointError",
                          "CheckpointExists", "CheckpointNotFound", "DataCheckFailed",
                          "DataGateFailed", "LockHeld", "NonFiniteLoss", "Preempted",
                          "RunDirError", "StateMismatch", "StoreError", "TrainguardError"),
    "trainguard.run": ("HeartbeatRecord", "ResumableLoader", "ResumableSampler", "Run",
                       "RunConfig", "expect_all", "expect_any", "expect_mean",
                       "read_heartbeat"),
    "trainguard.store": ("LocalStore", "ObjectStore", "Store", "open_store"),
})

if TYPE_CHECKING:
    from trainguard.checkpoint import (
        CheckpointInfo,
        CheckpointManager,
        RetentionPolicy,
        RNGState,
        SaveHandle,
        keep_any,
        keep_best,
        keep_every,
        keep_last,
        keep_newer_than,
    )
    from trainguard.data_manifest import DataGate
    from trainguard.errors import (
        EXIT_RESUME,
        CheckpointCorrupt,
        CheckpointError,
        CheckpointExists,
        CheckpointNotFound,
        DataCheckFailed,
        DataGateFailed,
        LockHeld,
        NonFiniteLoss,
        Preempted,
        RunDirError,
        StateMismatch,
        StoreError,
        TrainguardError,
    )
    from trainguard.run import (
        HeartbeatRecord,
        ResumableLoader,
        ResumableSampler,
        Run,
        RunConfig,
        expect_all,
        expect_any,
        expect_mean,
        read_heartbeat,
    )
    from trainguard.store import LocalStore, ObjectStore, Store, open_store

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "DataCheckFailed",
    "DataGate",
    "DataGateFailed",
    "EXIT_RESUME",
    "HeartbeatRecord",
    "LocalStore",
    "LockHeld",
    "NonFiniteLoss",
    "ObjectStore",
    "Preempted",
    "RNGState",
    "ResumableLoader",
    "ResumableSampler",
    "RetentionPolicy",
    "Run",
    "RunConfig",
    "RunDirError",
    "SaveHandle",
    "StateMismatch",
    "Store",
    "StoreError",
    "TrainguardError",
    "__version__",
    "expect_all",
    "expect_any",
    "expect_mean",
    "keep_any",
    "keep_best",
    "keep_every",
    "keep_last",
    "keep_newer_than",
    "open_store",
    "read_heartbeat",
]
