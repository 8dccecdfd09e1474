"""What an ended attempt's log and exit code say: its error line, its signal, and whether a
retry could help (no processes)."""

from __future__ import annotations

import pytest

from trainguard.launch.failures import error_line, retry_cannot_fix, signal_name, tail_lines

TRACEBACK = """\
resumed after step 0
Traceback (most recent call last):
  File "/work/train.py", line 3, in <module>
    import foo
ModuleNotFoundError: No module named 'foo'
"""

SYNTAX = """\
  File "/work/train.py", line 1
    def (
        ^
SyntaxError: invalid syntax
"""

# What torchrun prints after a worker's own traceback, and our line after torchrun's.
TORCHRUN = """\
Traceback (most recent call last):
  File "/work/train.py", line 9, in <module>
    raise RuntimeError("rank 1 failed")
RuntimeError: rank 1 failed
[2024-06-01 10:00:00] ERROR failed (exitcode: 1) local_rank: 1
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
trainguard: torchrun exited with code 1; workers by local rank: {0: 0, 1: 1}
"""


@pytest.mark.parametrize("text, line", [
    (TRACEBACK, "ModuleNotFoundError: No module named 'foo'"),
    (SYNTAX, "SyntaxError: invalid syntax"),
    (TORCHRUN, "RuntimeError: rank 1 failed"),
    ("step 1\nstep 2\nkilled\n", None),
    ("    raise ValueError('indented: a source line, not the error')\n", None),
    ("KeyboardInterrupt\n", "KeyboardInterrupt"),
])
def test_the_error_line_is_the_last_line_naming_an_exception(tmp_path, text, line):
    log = tmp_path / "attempt-1.log"
    log.write_text(text)
    assert error_line(log) == line


def test_a_missing_log_has_no_error_line(tmp_path):
    assert error_line(tmp_path / "nothing.log") is None and tail_lines(tmp_path / "x") == []


def test_only_the_tail_of_a_long_log_is_read_and_its_cut_first_line_dropped(tmp_path):
    log = tmp_path / "attempt-1.log"
    log.write_text("x" * 100 + "\nValueError: early\nlast\n")
    assert tail_lines(log, max_bytes=30) == ["ValueError: early", "last"]
    assert tail_lines(log, max_bytes=10) == ["last"]  # "early" was cut in half: dropped


@pytest.mark.parametrize("line, started, cannot", [
    ("ModuleNotFoundError: No module named 'foo'", False, True),
    ("ImportError: cannot import name 'x' from 'y'", False, True),
    ("SyntaxError: invalid syntax", False, True),
    ("IndentationError: unexpected indent", False, True),
    ("ModuleNotFoundError: No module named 'foo'", True, False),  # after training began
    ("RuntimeError: CUDA error: an illegal memory access", False, False),
    (None, False, False),
])
def test_only_import_and_syntax_errors_before_training_are_not_retried(line, started, cannot):
    assert retry_cannot_fix(line, started_training=started) is cannot


def test_signal_names():
    assert [signal_name(c) for c in (-9, -15, -2, 0, 1, 75, None)] == [
        "SIGKILL", "SIGTERM", "SIGINT", None, None, None, None]
