"""Checkpoints: the verified on-disk format, the manager, retention and RNG capture."""

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

# Loaded on first use (PEP 562): retention policies need no torch, the manager does.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "trainguard.checkpoint.manager": ("CheckpointInfo", "CheckpointManager", "ManagerInterface"),
    "trainguard.checkpoint.writer": ("SaveHandle",),
    "trainguard.checkpoint.retention": ("RetentionPolicy", "keep_any", "keep_best",
                                        "keep_every", "keep_last", "keep_newer_than"),
    "trainguard.checkpoint.rng": ("RNGState",),
})

if TYPE_CHECKING:
    from trainguard.checkpoint.manager import CheckpointInfo, CheckpointManager, ManagerInterface
    from trainguard.checkpoint.retention import (
        RetentionPolicy,
        keep_any,
        keep_best,
        keep_every,
        keep_last,
        keep_newer_than,
    )
    from trainguard.checkpoint.rng import RNGState
    from trainguard.checkpoint.writer import SaveHandle

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "ManagerInterface",
    "RNGState",
    "RetentionPolicy",
    "SaveHandle",
    "keep_any",
    "keep_best",
    "keep_every",
    "keep_last",
    "keep_newer_than",
]
