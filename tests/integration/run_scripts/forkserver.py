"""A fork server for training attempts: torch is imported once, each attempt is a fork.

Usage: python -m tests.integration.run_scripts.forkserver MODULE...

A kill -9 test needs many real processes (a reference run, several killed attempts, a
final one), and each fresh Python process pays 3-5 s to import torch before it trains
for one second. Here one process imports torch (and the MODULEs) once, then forks a
child per attempt, as DataLoader does for its workers. Each child is a real process,
killed for real by the test with SIGKILL; only the import is shared. Nothing in this
process runs a torch op before forking, so no thread pool is inherited.

Protocol, one JSON object per line on stdin, one reply per line on stdout:

* ``{"op": "start", "argv": [...], "module": M | "script": PATH, "stdout": PATH,
  "stderr": PATH}`` -> ``{"pid": N}``: the child runs M (``python -m M``) or PATH as
  ``__main__`` with ``sys.argv = argv``, its stdout and stderr opened on the paths (a
  FIFO the test reads, or a file);
* ``{"op": "wait", "pid": N}`` -> ``{"code": C}``: the exit code (-9: killed by SIGKILL);
* ``{"op": "poll", "pid": N}`` -> ``{"code": C}``, or ``{"code": null}`` while it runs.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import traceback


def _child(command: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        out = os.open(command["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        err = os.open(command["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        sys.argv = list(command["argv"])
        if "module" in command:
            runpy.run_module(command["module"], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(command["script"], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # the child is leaving either way
                pass
        os._exit(code)


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for module in sys.argv[1:]:
        importlib.import_module(module)
    replies = sys.stdout
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "start":
            replies.flush()
            pid = os.fork()
            if pid == 0:
                _child(command)
            reply = {"pid": pid}
        elif command["op"] in ("wait", "poll"):
            flags = 0 if command["op"] == "wait" else os.WNOHANG
            pid, status = os.waitpid(command["pid"], flags)
            reply = {"code": os.waitstatus_to_exitcode(status) if pid else None}
        else:
            reply = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    main()
