"""trainguard: training runs that never lose progress.

Durable, verified, fast checkpoints on a local directory (the embedded default), with the
same code on Modal volumes and object stores as those backends land.
"""

__version__ = "0.1.0"

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
from trainguard.errors import (  # noqa: E402
    CheckpointCorrupt,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    LockHeld,
    RunDirError,
    StateMismatch,
    StoreError,
    TrainguardError,
)
from trainguard.store import LocalStore, Store, open_store  # noqa: E402

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "LocalStore",
    "LockHeld",
    "RNGState",
    "RetentionPolicy",
    "RunDirError",
    "SaveHandle",
    "StateMismatch",
    "Store",
    "StoreError",
    "TrainguardError",
    "__version__",
    "keep_any",
    "keep_best",
    "keep_every",
    "keep_last",
    "keep_newer_than",
    "open_store",
]
