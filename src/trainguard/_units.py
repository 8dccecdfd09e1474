"""Quantities as a person reads them, shared by every layer (no heavy imports here)."""

from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    """A duration in its two largest units: ``5`` -> ``"5s"``, ``125`` -> ``"2m05s"``,
    ``5400`` -> ``"1h30m"``, ``90000`` -> ``"1d01h"``.

    Rounded to the nearest second (an ETA of 195.9999 s reads ``"3m16s"``); a negative
    duration (clock skew, a step past its estimated total) reads ``"0s"``; None, NaN or
    infinity, an unknown duration, reads ``"-"``.
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
