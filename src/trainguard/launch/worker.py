"""The entry of every torchrun worker: ``python -m trainguard.launch.worker SCRIPT ARGS``.

It runs ``SCRIPT`` as ``__main__`` in the worker's own process (as ``python SCRIPT``
would) and records the script's exit code for the node's launcher, which reads them
back after torchrun exits (see ``launch/torchrun.py``): torchrun's own exit code is 1
whenever any worker exits non-zero, so only the workers' records tell a node whose every
worker saved and exited ``EXIT_RESUME`` from one that failed.

The record is written when the script ends, by ``sys.exit``, an uncaught exception
(recorded as 1) or by returning (0). A worker killed by a signal, or one that calls
``os._exit``, records nothing, which counts as a failure.

This module is imported by nothing in the package (only run with ``-m``), so that it is
not already in ``sys.modules`` when Python runs it as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable

from trainguard.launch.torchrun import ENV_EXITS, exit_record


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def run_as_main(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]``; its exit code."""
    sys.argv = [script, *args]
    script_dir = os.path.dirname(os.path.abspath(script))
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)  # as ``python SCRIPT`` does: its siblings import
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_code(exc)
    return 0


def _write_atomically(path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # not matched by the readers' glob
    tmp.write_text(text)
    os.replace(tmp, path)


def worker_main(argv: list[str],
                run: Callable[[str, list[str]], int] = run_as_main) -> int:
    """One torchrun worker: run ``SCRIPT ARGS`` and record its exit code.

    Args:
        argv: ``[SCRIPT, *ARGS]``.
        run: runs the script and returns its exit code (Modal's also sets up its volume
            paths).

    Returns:
        The script's exit code, also written to ``$TRAINGUARD_EXIT_DIR/local-rank-N``
        (N = ``$LOCAL_RANK``) when that variable is set. An uncaught exception is
        recorded as 1 and raised.
    """
    if not argv:
        raise SystemExit("usage: python -m trainguard.launch.worker SCRIPT [ARGS...]")
    exit_dir = os.environ.get(ENV_EXITS)
    record = exit_record(exit_dir, os.environ.get("LOCAL_RANK", "0")) if exit_dir else None
    if record is not None:
        # A worker restarted by torchrun's elastic agent: its earlier code is not its outcome.
        record.unlink(missing_ok=True)
    code = 1
    try:
        code = run(argv[0], list(argv[1:]))
    finally:
        if record is not None:
            _write_atomically(record, str(code))
    return code


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
