"""What an ended attempt says about itself: its signal, its error line, whether a retry helps.

Read by the supervisor after each attempt, to record an honest reason and message:

* a negative exit code is ``Popen``'s "killed by signal N": said as ``killed by SIGKILL``;
* the error line is the last line of the attempt's log that names an exception, e.g.
  ``ModuleNotFoundError: No module named 'foo'`` (the last line of Python's traceback);
* an attempt that failed before training started (no heartbeat of its own) with an
  import or syntax error is not retried: the same code fails the same way every time.
"""

from __future__ import annotations

import os
import re
import signal

#: Errors a retry cannot fix when they end an attempt before its first heartbeat.
NOT_RETRYABLE = ("ModuleNotFoundError", "ImportError", "SyntaxError", "IndentationError",
                 "TabError")

#: How much of the log's end is searched for the error line.
TAIL_BYTES = 64 * 1024

# ``pkg.mod.SomeError: text`` or a bare ``SomeError`` at the start of a line: the last line
# of a traceback (and of a SyntaxError report, which has no "Traceback" header).
_EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(?::\s?.*)?$")
# torchrun's own summary of a failed worker: the worker's line above it says more.
_WRAPPERS = ("ChildFailedError",)


def signal_name(code: int | None) -> str | None:
    """``SIGKILL`` for Popen's exit code -9; None for an exit code that is not a signal."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def tail_lines(path: str | os.PathLike, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The last lines of ``path`` (at most ``max_bytes`` of it); [] when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return lines[1:] if size > max_bytes else lines  # the first may be cut in half


def error_line(path: str | os.PathLike) -> str | None:
    """The last line of the log at ``path`` that names an exception, e.g.
    ``RuntimeError: injected crash``; None when there is none."""
    for line in reversed(tail_lines(path)):
        text = line.rstrip()
        match = _EXCEPTION_LINE.match(text)
        if match and match.group(1) not in _WRAPPERS:
            return text
    return None


def exception_name(line: str | None) -> str | None:
    """``ModuleNotFoundError`` for ``ModuleNotFoundError: No module named 'foo'``."""
    match = _EXCEPTION_LINE.match(line or "")
    return match.group(1) if match else None


def retry_cannot_fix(line: str | None, started_training: bool) -> bool:
    """Whether an attempt that failed with error ``line`` would fail the same way again:
    an import or syntax error before it ever wrote a heartbeat."""
    return not started_training and exception_name(line) in NOT_RETRYABLE
