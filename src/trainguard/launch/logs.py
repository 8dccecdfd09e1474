"""A local job's output: the attempt logs, when each part of them was written, and reading
them as ``trainguard logs`` does (``--tail N``, ``--since 10m``, ``-f``).

The script writes its own log file (``jobs/<id>/attempt-<n>.log``, its stdout and stderr);
nothing stamps its lines. The supervisor notes, at every poll, how long the file has
grown by then, in ``attempt-<n>.times`` beside it (one ``TIME SIZE`` line each time the
size changed). ``--since T`` starts at the first byte that was not yet written at the
last note taken before T: it may show up to one poll interval (0.5 s) more, never less.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def times_path(log_path: Path) -> Path:
    return log_path.with_suffix(".times")


class LogClock:
    """Notes how far ``log_path`` had grown, and when (call :meth:`tick` at each poll)."""

    def __init__(self, log_path: Path, clock=None) -> None:
        import time

        self.log_path, self.clock = log_path, clock or time.time
        self._size = -1

    def tick(self) -> None:
        try:
            size = self.log_path.stat().st_size
        except OSError:
            return
        if size != self._size:
            self._size = size
            with open(times_path(self.log_path), "a") as out:
                out.write(f"{self.clock():.3f} {size}\n")


def _notes(log_path: Path) -> list[tuple[float, int]]:
    try:
        lines = times_path(log_path).read_text().splitlines()
    except OSError:
        return []
    notes = []
    for line in lines:
        parts = line.split()
        try:
            notes.append((float(parts[0]), int(parts[1])))
        except (IndexError, ValueError):  # a torn last line of a killed supervisor
            continue
    return notes


def offset_since(log_path: Path, since: float) -> int | None:
    """Where the output written at ``since`` or later begins (None: nothing since).

    A log without notes (written by an older trainguard) is whole when modified since,
    else nothing.
    """
    try:
        stat = log_path.stat()
    except OSError:
        return None
    notes = _notes(log_path)
    if not notes:
        return 0 if stat.st_mtime >= since else None
    before = [size for t, size in notes if t < since]
    offset = before[-1] if before else 0
    if offset >= stat.st_size:
        return None
    return _line_start(log_path, offset)


def _line_start(path: Path, offset: int) -> int:
    """The start of the line holding byte ``offset``."""
    with open(path, "rb") as handle:
        pos = offset
        while pos > 0:
            step = min(65536, pos)
            handle.seek(pos - step)
            cut = handle.read(step).rfind(b"\n")
            if cut >= 0:
                return pos - step + cut + 1
            pos -= step
    return 0


def offset_of_tail(path: Path, lines: int, start: int = 0) -> int:
    """Where the last ``lines`` lines of ``path`` (from byte ``start`` on) begin."""
    size = path.stat().st_size
    if lines <= 0:
        return size
    with open(path, "rb") as handle:
        end = size
        if size > start:
            handle.seek(size - 1)
            if handle.read(1) == b"\n":  # the last line's own newline ends no other line
                end = size - 1
        pos, needed = end, lines
        while pos > start:
            step = min(65536, pos - start)
            handle.seek(pos - step)
            block = handle.read(step)
            cut = len(block)
            while (cut := block.rfind(b"\n", 0, cut)) >= 0:
                needed -= 1
                if needed == 0:
                    return pos - step + cut + 1
            pos -= step
    return start


def read_from(path: Path, offset: int) -> tuple[str, int]:
    """The text of ``path`` from ``offset``, and the offset after it."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return "", offset
    return data.decode(errors="replace"), offset + len(data)


def attempt_log(job_dir: Path, n: int) -> Path:
    return job_dir / f"attempt-{n}.log"


def attempts_with_output(job_dir: Path, last: int, since: float | None) -> Iterator[int]:
    for n in range(1, last + 1):
        path = attempt_log(job_dir, n)
        if path.exists() and (since is None or offset_since(path, since) is not None):
            yield n


def start_offset(path: Path, *, tail: int | None, since: float | None) -> int:
    """Where reading ``path`` begins for ``--tail`` and ``--since`` (both: the later)."""
    if not path.exists():
        return 0
    offset = 0
    if since is not None:
        found = offset_since(path, since)
        offset = path.stat().st_size if found is None else found
    if tail is not None:
        offset = max(offset, offset_of_tail(path, tail, offset))
    return offset


__all__ = ["LogClock", "attempt_log", "attempts_with_output", "offset_of_tail",
           "offset_since", "read_from", "start_offset", "times_path"]
