"""Checkpoints: the verified on-disk format, the manager, retention and RNG capture."""

from trainguard.checkpoint.manager import CheckpointInfo, CheckpointManager
from trainguard.checkpoint.saving import SaveHandle
from trainguard.checkpoint.retention import (
    RetentionPolicy,
    keep_any,
    keep_best,
    keep_every,
    keep_last,
    keep_newer_than,
)
from trainguard.checkpoint.rng import RNGState

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "RNGState",
    "RetentionPolicy",
    "SaveHandle",
    "keep_any",
    "keep_best",
    "keep_every",
    "keep_last",
    "keep_newer_than",
]
