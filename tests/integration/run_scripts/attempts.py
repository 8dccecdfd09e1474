"""The parent side of the fork server: start attempts, follow their stdout, kill -9 them.

The kill plan of the tests lives here too: an attempt is killed a random number of its
output lines after a checkpoint it committed has been *observed* in the run directory,
so where the kill lands follows what the run did, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVER = "tests.integration.run_scripts.forkserver"
LINE_TIMEOUT = 120.0  # a child silent this long is stuck: fail instead of hanging


def newest_commit(run_dir: Path) -> int:
    """The newest step with a manifest (the commit marker); 0 when none."""
    steps = [int(p.parent.name.removeprefix("step-"))
             for p in (Path(run_dir) / "checkpoints").glob("step-*/manifest.json")]
    return max(steps, default=0)


class Attempt:
    """One forked training attempt whose stdout is a FIFO the test reads line by line."""

    def __init__(self, server: ForkServer, pid: int, fifo_fd: int | None) -> None:
        self.server, self.pid, self._fd = server, pid, fifo_fd
        self._buffer = b""
        self.code: int | None = None

    def lines(self) -> Iterator[str]:
        """The child's stdout lines as they come; ends when the child closes it."""
        assert self._fd is not None
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                yield line.decode()
            ready, _, _ = select.select([self._fd], [], [], LINE_TIMEOUT)
            assert ready, f"attempt {self.pid} printed nothing for {LINE_TIMEOUT:.0f} s"
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return
            self._buffer += chunk

    def kill(self) -> None:
        """SIGKILL, the real thing."""
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        """The exit code (-9 when killed), once the child has exited."""
        if self.code is None:
            self.code = self.server.request({"op": "wait", "pid": self.pid})["code"]
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return self.code


class ForkServer:
    """A running fork server (see forkserver.py), with torch and ``preload`` imported."""

    def __init__(self, tmp: Path, preload: tuple[str, ...]) -> None:
        self.tmp = Path(tmp)
        self._count = 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", SERVER, *preload], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        assert json.loads(self.proc.stdout.readline()).get("ready"), "fork server failed"

    def request(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], *, module: str | None = None, script: str | None = None,
              stderr: Path, follow: bool = True) -> Attempt:
        """Fork an attempt running ``module`` or ``script`` with ``argv``.

        With ``follow`` its stdout is a FIFO read through ``Attempt.lines()``; else it
        goes to a file (an attempt nobody reads must not block on a full pipe).
        """
        self._count += 1
        out = self.tmp / f"attempt-{self._count}.out"
        fd = None
        if follow:
            os.mkfifo(out)
            fd = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # a reader exists: no blocking
        target = {"module": module} if module else {"script": script}
        pid = self.request({"op": "start", "argv": argv, **target, "stdout": str(out),
                            "stderr": str(stderr)})["pid"]
        return Attempt(self, pid, fd)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def kill_after_commit(attempt: Attempt, run_dir: Path, rng: random.Random,
                      at_line: str | None = None) -> int:
    """Let ``attempt`` run until a checkpoint newer than the run directory's newest at the
    start has landed, then a random 0-4 of its lines more (or, with ``at_line``, until
    the next line starting with it), then SIGKILL it. Returns its exit code: -9, or 0
    when it finished before the kill came."""
    before = newest_commit(run_dir)
    more, committed = rng.randint(0, 4), False
    for line in attempt.lines():
        if not committed:
            committed = newest_commit(run_dir) > before
            continue
        if at_line is not None:
            if line.startswith(at_line):
                break
        elif more == 0:
            break
        else:
            more -= 1
    if attempt.code is None:
        try:
            attempt.kill()
        except ProcessLookupError:  # it finished on its own
            pass
    return attempt.wait()


def _preload() -> tuple[str, ...]:
    """What the fork server imports once: torch, trainguard, and what the scripts use."""
    import importlib.util

    optional = ("torchdata.stateful_dataloader", "sklearn.datasets")
    present = tuple(m for m in optional if importlib.util.find_spec(m.split(".")[0]))
    return ("torch", "numpy", "torch.utils.data", "trainguard.run", *present)


PRELOAD = _preload()


def killed_and_resumed(server: ForkServer, tmp: Path, argv, target: dict, *, kills: int = 3,
                       seed: str = "0", at_line: str | None = None) -> tuple[Path, Path]:
    """A reference run (concurrently) and a run killed ``kills`` times, then finished.

    ``argv(run_dir)`` gives the command line of a run in ``run_dir``; ``target`` is
    ``{"module": M}`` or ``{"script": PATH}``. Every other kill waits for a line starting
    with ``at_line`` (when given). Returns (reference dir, resumed dir) once both ended
    with exit code 0.
    """
    log = tmp / "log"
    reference, resumed = tmp / "reference", tmp / "resumed"
    ref = server.start(argv(reference), **target, stderr=log, follow=False)
    rng = random.Random(seed)
    landed = 0
    for k in range(kills):
        attempt = server.start(argv(resumed), **target, stderr=log)
        code = kill_after_commit(attempt, resumed, rng, at_line=at_line if k % 2 else None)
        if code == 0:  # it finished before its kill came (a very slow parent)
            break
        assert code == -9, log.read_text()[-3000:]
        landed += 1
    assert landed >= 1, "no kill landed before the run finished"
    final = server.start(argv(resumed), **target, stderr=log, follow=False)
    assert final.wait() == 0, log.read_text()[-3000:]
    assert ref.wait() == 0, log.read_text()[-3000:]
    return reference, resumed
