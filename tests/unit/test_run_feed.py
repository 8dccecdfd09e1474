"""BatchFeed: the batch of each step of run.steps(total, data=...)."""

from __future__ import annotations

import pytest

from trainguard.run.feed import BatchFeed


def test_batch_feed_crosses_epochs_and_refuses_empty_data():
    feed = BatchFeed([1, 2, 3], checks=[], skip=lambda step: step == 2, on_skip=lambda s: None)
    assert [feed.next(step, 10) for step in range(1, 5)] == [1, 3, 1, 2]
    with pytest.raises(ValueError, match="no batch"):
        BatchFeed([], checks=[], skip=lambda s: False, on_skip=None).next(1, 10)
