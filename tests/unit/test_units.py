"""Quantities as a person reads them: the one duration and byte-size wording."""

from __future__ import annotations

import math

import pytest

from trainguard._units import human_bytes, human_duration


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (5, "5s"), (59.4, "59s"), (59.6, "1m00s"), (125, "2m05s"),
    (195.99999, "3m16s"), (3599.6, "1h00m"), (5400, "1h30m"), (90000, "1d01h"),
    (-30, "0s"), (None, "-"), (math.inf, "-"), (math.nan, "-"),
])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 1536, 5 * 2**30, 3 * 2**40)] == \
        ["512 B", "1.5 KiB", "5.0 GiB", "3.0 TiB"]
