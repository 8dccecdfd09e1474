"""The public surface is explicit: a change to it is a decision, not an accident."""

import trainguard

EXPECTED = [
    "CheckpointCorrupt", "CheckpointError", "CheckpointExists", "CheckpointInfo",
    "CheckpointManager", "CheckpointNotFound", "DataCheckFailed", "DataGate", "DataGateFailed",
    "EXIT_RESUME", "HeartbeatRecord", "LocalStore", "LockHeld", "NonFiniteLoss", "ObjectStore",
    "Preempted", "RNGState", "ResumableLoader", "ResumableSampler", "RetentionPolicy", "Run",
    "RunConfig", "RunDirError", "SaveHandle", "StateMismatch", "Store", "StoreError",
    "TrainguardError", "__version__", "expect_all", "expect_any", "expect_mean", "keep_any",
    "keep_best", "keep_every", "keep_last", "keep_newer_than", "open_store", "read_heartbeat",
]


def test_exported_names_are_pinned_and_sorted():
    assert trainguard.__all__ == sorted(trainguard.__all__)
    assert trainguard.__all__ == sorted(EXPECTED)
    assert all(hasattr(trainguard, name) for name in trainguard.__all__)


def test_every_error_derives_from_the_root_and_has_an_exit_code():
    errors = [getattr(trainguard, n) for n in trainguard.__all__
              if isinstance(getattr(trainguard, n), type)
              and issubclass(getattr(trainguard, n), trainguard.TrainguardError)]
    assert len(errors) >= 10
    assert all(isinstance(e.exit_code, int) and e.exit_code > 0 for e in errors)
