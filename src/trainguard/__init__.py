"""trainguard: training runs that never lose progress.

Durable, verified, fast checkpoints on a local directory (the embedded default) or an
object store, a guard around the training loop (``Run``), jobs that survive their
launcher (``trainguard run``), and data gates that stop doomed runs before they start.
"""

from trainguard._version import __version__

from trainguard.checkpoint import (  # noqa: E402
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
from trainguard.data import DataGate  # noqa: E402
from trainguard.errors import (  # noqa: E402
    CheckpointCorrupt,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    DataGateFailed,
    LockHeld,
    RunDirError,
    StateMismatch,
    StoreError,
    TrainguardError,
)
from trainguard.run import (  # noqa: E402
    EXIT_RESUME,
    DataCheckFailed,
    HeartbeatRecord,
    NonFiniteLoss,
    Preempted,
    ResumableLoader,
    ResumableSampler,
    Run,
    RunConfig,
    expect_all,
    expect_any,
    expect_mean,
    read_heartbeat,
)
from trainguard.store import LocalStore, ObjectStore, Store, open_store  # noqa: E402

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
